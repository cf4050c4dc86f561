"""The GPU benchmarks' --tiny mode runs on CPU in seconds, so a broken benchmark fails CI, not a GPU session."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def run_tiny(script: str, out, *extra: str):
    """Run a benchmark's --tiny mode; its completed process and the JSON it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--tiny", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        (
            "bench/generate.py",
            ["--compare-windows", "32", "2", "--shared-prompts", "2", "--pad-spread", "2", "--compare-kernel"],
        ),
        ("bench/validate.py", ["--also", "4x1"]),
    ],
)
def test_benchmark_tiny_mode_runs_and_reports_ratios(tmp_path, script, extra):
    result, data = run_tiny(script, tmp_path / "result.json", *extra)
    assert data["speedup"] > 0 and data["env"]["torch"]
    assert "vs baseline" in result.stdout or "capdpo / baseline" in result.stdout
    if script == "bench/generate.py":  # the other window steps are timed at the best batch
        best = max(data["capdpo"], key=lambda e: e["images_per_s"])["batch"]
        assert [(w["window_step"], w["batch"]) for w in data["capdpo_window_steps"]] == [(32, best), (2, best)]
        assert data["window_step"] == 0  # the stages' default: the whole cache
        assert all(w["images_per_s"] > 0 for w in data["capdpo_window_steps"])
        # the prefill timed alone on the same images; the decode steps take the rest of the best batch's time
        split, entry = data["capdpo_split"], max(data["capdpo"], key=lambda e: e["images_per_s"])
        per_batch = entry["seconds"] * entry["batch"] / entry["images"]
        assert split["batch"] == best and 0 < split["prefill_s_per_batch"]
        assert split["prefill_s_per_batch"] + split["decode_s_per_batch"] == pytest.approx(per_batch)
        assert {"prefill_floor_s", "decode_floor_s"} <= split.keys()  # NaN here: the tiny mode measures no rates
        # the same floor at the prefill MLP GEMM's sustained rate, reported beside it (NaN here too)
        assert {"matmul_flops_sustained", "prefill_floor_sustained_s", "decode_floor_sustained_s"} <= split.keys()
        assert "rows, prefill:" in result.stdout and "rows, decode:" in result.stdout
        assert (
            data["pad_spread"] == 2
        )  # left-padded batches (instructions of 12..14 tokens), baseline and capdpo alike
        # stage 3's shape: the same requests with one prefill per prompt and with one per row
        shared = data["capdpo_shared_prompts"]
        assert shared["batch"] == best and shared["requests_per_prompt"] == 2
        assert shared["speedup"] == pytest.approx(shared["per_row_s"] / shared["shared_s"]) and shared["shared_s"] > 0
        # the decode kernel the other way round from the run's decoder, at the best batch
        assert data["decode_kernel"] is False
        flipped = data["capdpo_decode_kernel_flipped"]
        assert flipped["decode_kernel"] is True and flipped["batch"] == best and flipped["images_per_s"] > 0
    else:  # the other shape is timed on the same groups
        [also] = data["capdpo_shared_prefix_also"]
        assert (also["batch"], also["images_per_pass"]) == (4, 1) and also["candidates_per_s"] > 0


def test_levers_tiny_mode_measures_every_part():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/levers.py"), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "rope equal: True True" in result.stdout
    assert result.stdout.count("decode") == 4 and "fused 7 text modules" in result.stdout


def test_decode_levers_tiny_mode_times_every_configuration(tmp_path):
    result, data = run_tiny("bench/decode.py", tmp_path / "decode.json")
    assert list(data["configs"]) == [
        "separate projections",
        "joined projections",
        "joined projections, window step 32",
        "sampled, eager sampler",
        "sampled, compiled sampler",
    ]
    assert all(c["generate_s"] > 0 and c["prefill_s"] > 0 for c in data["configs"].values())
    assert data["joined_projection_groups"] == 4  # 2 layers x (q/k/v, gate/up)
    assert data["joined_vs_separate_token_agreement"] == 1.0  # float32: the same tokens
    assert data["compiled_sampler_tokens_equal"] is True and data["compiled_sampler_scores_equal"] is True
    assert "4 bare decode steps" in result.stdout
    _, kernel = run_tiny("bench/decode.py", tmp_path / "kernel.json", "--attention-only")
    assert list(kernel["configs"]) == ["SDPA attention", "decode kernel"]  # the CPU has no kernel: SDPA both times
    assert kernel["attention_call"]["max_abs_diff"] == 0.0 and kernel["kernel_vs_sdpa_token_agreement"] == 1.0
    errors = kernel["attention_call"]["vs_float32"]  # each against the same attention in float32
    assert errors["sdpa"] == errors["kernel"] and errors["sdpa"]["max_abs"] >= errors["sdpa"]["mean_abs"] >= 0
    _, call = run_tiny("bench/decode.py", tmp_path / "call.json", "--attention-only", "--call-only")
    assert call["configs"] == {} and call["attention_call"]["written"] < call["attention_call"]["slots"]
    _, both = run_tiny("bench/decode.py", tmp_path / "overlap.json", "--overlap")
    o = both["overlap"]
    assert o["apart_s"] == pytest.approx(o["decode_batch_s"] + o["prefill_batch_s"]) and o["together_s"] > 0
    assert 0 < o["prefill_of_decoded_batch_s"] < o["decode_batch_s"]


def test_operator_bench_times_every_form_against_eager(tmp_path):
    result, data = run_tiny("bench/ops.py", tmp_path / "ops.json")
    assert list(data["ops"]) == ["vision rotary", "text RMSNorm"]  # the tiny mode's two (a GPU run times six)
    for entry in data["ops"].values():
        forms = entry["forms"]
        assert {"eager", "compiled, all sizes symbolic (capdpo)", "compiled, static sizes"} <= forms.keys()
        assert forms["eager"]["equal_to_eager"] is True and all(f["ms"] > 0 for f in forms.values())
        assert entry["bytes_read_and_written"] > 0
    # the library's own function computes what capdpo's eager form computes, bit for bit
    assert data["ops"]["vision rotary"]["forms"]["library (eager)"]["equal_to_eager"] is True
    assert "vision rotary, compiled, halves" in result.stdout


def test_device_busy_time_counts_overlapping_kernels_once():
    from bench.common import covered

    assert covered([]) == 0
    assert covered([(0, 10), (5, 12), (20, 25), (21, 22), (12, 13)]) == 18  # 0-13 and 20-25
    assert covered([(30, 40), (0, 5)]) == 15


def test_idle_device_time_is_charged_to_the_host_operator_running_meanwhile():
    from bench.common import idle_by_host_op

    kernels = [(10, 20), (30, 40), (35, 50)]  # idle: 0-10, 20-30, 50-60
    ops = [(0, 6, "aten::copy_"), (22, 25, "aten::isfinite"), (25, 28, "aten::isfinite"), (52, 70, "Optimizer.step")]
    waits = dict(idle_by_host_op(kernels, ops, 0, 60))
    assert waits == {"aten::copy_": 6, "aten::isfinite": 6, "Optimizer.step": 8, "(no operator: Python)": 10}
    assert sum(waits.values()) == 30  # every idle moment counted once


def _python_call(name: str, ts: float, dur: float, pid: int, parent: int | None = None) -> dict:
    args = {"Python id": pid} | ({} if parent is None else {"Python parent id": parent})
    return {"ph": "X", "cat": "python_function", "name": name, "ts": ts, "dur": dur, "args": args}


def test_idle_device_time_is_charged_to_the_python_functions_running_meanwhile():
    from bench.common import python_idle_table

    def kernel(ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": "gemm", "ts": ts, "dur": dur}

    # step() 0-100 ms calls collate() 10-40, which calls pad() 20-30, and then loss() 60-90 (trace times in us)
    ms = 1000
    calls = [
        _python_call("trainer.py(1): step", 0, 100 * ms, 1),
        _python_call("data.py(5): collate", 10 * ms, 30 * ms, 2, parent=1),
        _python_call("data.py(9): pad", 20 * ms, 10 * ms, 3, parent=2),
        _python_call("loss.py(3): loss", 60 * ms, 30 * ms, 4, parent=1),
    ]
    kernels = [kernel(0, 12 * ms), kernel(25 * ms, 50 * ms), kernel(80 * ms, 5 * ms)]  # idle 12-25, 75-80, 85-100
    table = python_idle_table({"traceEvents": calls + kernels})

    def row(section: str, name: str) -> float:
        part = table.split(section)[1].split("\n\n")[0]
        (line,) = [ln for ln in part.splitlines() if ln.endswith(name)]
        return float(line.split()[0])

    assert table.startswith("device idle 33.0 ms of the 100.0 ms recorded")
    # own: pad 20-25; collate 12-20; loss 75-80 and 85-90; step 90-100
    names = ("pad", "collate", "loss", "step")
    assert [row("own (not inside a callee):", n) for n in names] == [5.0, 8.0, 10.0, 10.0]
    assert [row("inclusive of callees:", n) for n in names] == [5.0, 13.0, 10.0, 33.0]


def test_python_idle_reads_a_trace_the_profiler_wrote(tmp_path):
    """The field names the analysis relies on are the ones torch.profiler exports with `with_stack=True`."""
    import json

    import torch

    from bench.common import profiler, python_idle_table

    def busy_python() -> int:
        total = 0
        for i in range(20000):
            total += i * i
        return total

    with profiler(cuda=False, python=True) as prof:
        torch.ones(4).sum()
        busy_python()
        torch.ones(4).sum()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    trace = json.loads((tmp_path / "trace.json").read_text())
    calls = [e for e in trace["traceEvents"] if e.get("cat") == "python_function"]
    assert any(e["name"].endswith("busy_python") and "Python id" in e["args"] for e in calls)
    # a device that is busy except while busy_python runs: all of its idle time is that function's own
    (busy,) = [e for e in calls if e["name"].endswith("busy_python")]
    first = min(e["ts"] for e in calls)
    last = max(e["ts"] + e["dur"] for e in calls)
    trace["traceEvents"] += [
        {"ph": "X", "cat": "kernel", "name": "k", "ts": first, "dur": busy["ts"] - first},
        {
            "ph": "X",
            "cat": "kernel",
            "name": "k",
            "ts": busy["ts"] + busy["dur"],
            "dur": last - busy["ts"] - busy["dur"],
        },
    ]
    table = python_idle_table(trace, rows=10_000)
    # other threads (a test runner's) may hold Python calls too: read busy_python's own row
    own = table.split("own (not inside a callee):")[1].split("\n\n")[0].splitlines()
    (row,) = [line for line in own if line.endswith("busy_python")]
    assert float(row.split()[0]) >= 0.5 * busy["dur"] / 1e3 > 0  # its loop calls nothing traced


def test_captioning_floor_splits_into_prefill_and_decode_in_both_regimes():
    from bench.common import Shapes
    from bench.generate import floor_images_per_s, floor_seconds

    shapes = Shapes()  # 448 px: 1024 patches, 256 image tokens; prompt 20 + 256 + 12 + 2 = 290 tokens
    params = {"text_layers": 1e9, "lm_head": 1e8, "vision": 1e8, "vision_merger": 1e7}
    attention = {"text_width": 1000, "vision_flops": 5e9}
    batch, steps = 4, 8
    # vision blocks on 1024 patches, merger on 256 tokens, vision attention; layers on 290 tokens with causal
    # attention; the head on the last token only
    image = 2e8 * 1024 + 2e7 * 256 + 5e9 + 2e9 * 290 + 4 * (290 * 291 / 2) * 1000 + 2e8
    prefill = batch * image / 1e12
    # the prefill gives the first token: 7 decode steps, step s feeding position 290 + s - 1 (attending 290 + s keys)
    compute = {"matmul_flops": 1e12, "copy_bytes_per_s": 1e15}  # compute-bound steps
    decode = sum(batch * (2 * 1.1e9 + 4 * (290 + s) * 1000) for s in range(1, steps)) / 1e12
    assert floor_seconds(batch, steps, shapes, params, compute, 0.0, attention) == pytest.approx((prefill, decode))
    # memory-bound steps: the weights (bf16, head included) and the cache written so far read at 1 GB/s
    memory = {"matmul_flops": 1e12, "copy_bytes_per_s": 1e9}
    kv = 1000.0
    reads = sum(2 * 1.1e9 + kv * batch * (290 + s - 1) for s in range(1, steps))
    assert floor_seconds(batch, steps, shapes, params, memory, kv, attention) == pytest.approx((prefill, reads / 1e9))
    assert floor_images_per_s(batch, steps, shapes, params, memory, kv, attention) == pytest.approx(
        batch / (prefill + reads / 1e9)
    )


def test_work_counts_split_the_parameters_by_where_they_run():
    import torch

    from bench.common import Shapes, attention_shapes, build_model, param_counts, qwen25vl_config

    model = build_model("tiny", "cpu")
    counts = param_counts(model)
    visual = sum(p.numel() for p in model.model.visual.parameters())
    merger = sum(p.numel() for p in model.model.visual.merger.parameters())
    layers = sum(p.numel() for p in model.model.language_model.layers.parameters())
    norm = model.model.language_model.norm.weight.numel()
    assert (counts["vision"], counts["vision_merger"]) == (visual - merger, merger)
    assert counts["text_layers"] == layers + norm  # the embedding and the (untied) head are not layers
    assert counts["lm_head"] == model.lm_head.weight.numel()
    # a tied head is the embedding: counted once in the total, never as a layer
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    tied = param_counts(model)
    assert tied["text_layers"] == counts["text_layers"] and tied["total"] == counts["total"] - counts["lm_head"]
    del torch

    # 7B's vision tower at 448 px: 32x32 patches in 16 windows of 8x8 patches; blocks 7, 15, 23, 31 see all 1024
    cfg = qwen25vl_config("7b")
    work = attention_shapes(cfg, Shapes())
    assert work["text_width"] == 28 * 28 * 128
    assert work["vision_flops"] == 4 * 1280 * (4 * 1024**2 + 28 * 16 * 64**2)
    # 504 px: 18x18 merged tokens, windows of 4 -> spans 4, 4, 4, 4, 2 each way (edge windows are smaller)
    spans = [4, 4, 4, 4, 2]
    windowed = sum((4 * a * b) ** 2 for a in spans for b in spans)
    assert attention_shapes(cfg, Shapes(image_side=504))["vision_flops"] == 4 * 1280 * (4 * 1296**2 + 28 * windowed)
    cfg.vision_config.window_size = 0  # a tower without windows (Qwen2-VL's, Qwen3-VL's): every block sees all
    assert attention_shapes(cfg, Shapes())["vision_flops"] == 4 * 1280 * 32 * 1024**2


def test_validation_floor_counts_the_prefix_once_and_each_suffix_on_it():
    from bench.common import Shapes
    from bench.validate import floor_candidates_per_s

    shapes = Shapes()  # 1024 patches, 256 image tokens
    params = {"text_layers": 1e9, "lm_head": 1e8, "vision": 1e8, "vision_merger": 1e7}
    attention = {"text_width": 1000, "vision_flops": 5e9}
    prompt, suffix, candidates = 300, 20, 40
    prefix = 280
    image = 2e8 * 1024 + 2e7 * 256 + 5e9 + 2e9 * prefix + 4 * (prefix * (prefix + 1) / 2) * 1000  # no head
    # each suffix token attends to the whole prefix and causally to its own suffix; the head on the last token
    each = 2e9 * suffix + 4 * (suffix * prefix + suffix * (suffix + 1) / 2) * 1000 + 2e8
    rates = {"matmul_flops": 1e12}
    expected = candidates / ((image + candidates * each) / 1e12)
    got = floor_candidates_per_s(candidates, prompt, suffix, shapes, params, rates, attention)
    assert got == pytest.approx(expected)


def test_run_all_runs_the_benchmarks_and_prints_one_table(tmp_path):
    """bench/run_all.py --tiny: each benchmark writes its JSON and the runner reads them back into one table."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--only", "generate", "validate",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    generate, validate = (json.loads((tmp_path / f"{name}_gpu.json").read_text()) for name in ("generate", "validate"))
    lines = result.stdout.splitlines()
    row = next(line for line in lines if line.startswith("captioning 7B"))
    assert f"{generate['speedup']:.2f}x" in row
    row = next(line for line in lines if line.startswith("validation 3B"))
    assert f"{validate['speedup']:.1f}x" in row
