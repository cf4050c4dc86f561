"""bench/train_gpu.py's --tiny mode: the GPU benchmark script runs end to end on CPU (ours and the TRL baseline)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.helpers import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("train_gpu_bench", ROOT / "bench" / "train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("baseline", [False, True])
def test_tiny_bench_writes_a_complete_result(tmp_path, baseline: bool) -> None:
    out = tmp_path / "result.json"
    _bench().run(["--tiny", "--out", str(out), *(["--baseline"] if baseline else [])])
    result = json.loads(out.read_text())
    assert result["mode"] == ("trl-baseline" if baseline else "capdpo")
    assert result["device"] == "cpu" and result["gpus"] == 1
    assert result["timed_steps"] == 2 and len(result["step_seconds"]) == 2
    # each timed step's loop (from the previous step's end) holds the step and the work around it
    loops, steps = result["loop_seconds"], result["step_seconds"]
    assert len(loops) == 2 and all(loop >= step > 0 for loop, step in zip(loops, steps, strict=True))
    assert 0 < result["loop_pairs_per_second"] <= result["pairs_per_second"]
    # the step's phases along its timeline add up to the step, and both images and text were timed
    phases = result["phase_ms"]
    assert set(phases) == {"prelude", "vision", "text_forward", "after_last_forward", "other", "step"}
    parts = sum(v for k, v in phases.items() if k != "step")
    assert parts == pytest.approx(phases["step"], abs=0.05)
    assert phases["text_forward"] > 0 and phases["after_last_forward"] > 0
    # ours reads the image features cached before training; TRL's baseline runs the vision tower in every step
    assert result["cached_image_features"] is (not baseline)
    assert (phases["vision"] > 0) is baseline
    assert phases["step"] == pytest.approx(1e3 * sum(steps) / len(steps), rel=0.25)
    assert result["pairs_per_second"] > 0
    # the host pauses inside each timed step: garbage collection and torch.compile graphs
    assert len(result["gc_ms_per_step"]) == len(result["full_gc_per_step"]) == 2
    assert all(ms >= 0 for ms in result["gc_ms_per_step"]) and len(result["graphs_compiled_per_step"]) == 2
    assert len(result["losses"]) == 3 and all(math.isfinite(v) for v in result["losses"])
    assert result["versions"]["trl"] and result["shapes"]["image_tokens"] > 0
    assert result["lora"]["trainable_params"] > 0
    # ours encodes each image once and reads a precomputed reference; TRL's baseline does neither
    assert result["share_image_features"] is (not baseline)
    assert result["precomputed_reference"] is (not baseline)


def test_step_timer_counts_the_garbage_collector_and_compiled_graphs_inside_a_step() -> None:
    """A full collection and a compiled graph inside a timed step are charged to that step, not to the next."""
    import gc
    from types import SimpleNamespace

    import torch

    timer = _bench()._timer_callback(warmup=0, cuda=False)
    try:
        garbage = [[i] for i in range(200_000)]
        for step in (1, 2):
            timer.on_step_begin(None, SimpleNamespace(global_step=step - 1), None)
            if step == 1:
                del garbage
                gc.collect()
                torch._dynamo.reset()
                torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
            timer.on_step_end(None, SimpleNamespace(global_step=step), None)
        assert timer.full_gcs == [1, 0]
        assert timer.gc_ms[0] > timer.gc_ms[1] >= 0
        assert timer.graphs == [1, 0]
    finally:
        gc.callbacks.remove(timer._on_gc)
