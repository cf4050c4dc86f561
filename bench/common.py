"""Shared pieces of the benchmarks: full-size architectures with random weights, synthetic VLM inputs, and the
hardware rates (bf16 matmul throughput, memory copy bandwidth) measured in the same run.

Random weights give honest speed and memory, never quality. Every benchmark measures its baseline and capdpo's
path in one process on the same inputs and reports the ratio.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# NVLink multicast can take shared GPUs out of service: keep it off in every process the benchmarks start.
for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_key, _value)

# Qwen2.5-VL-7B / 3B text settings (from their published configs); the vision tower is the same for both.
TEXT = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
}  # fmt: skip
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


def qwen25vl_config(size: str) -> Any:
    """A Qwen2.5-VL config of the given size ("7b", "3b" or "tiny")."""
    from transformers import Qwen2_5_VLConfig

    text = dict(TEXT[size])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    mrope = [16, 24, 24] if head_dim == 128 else [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    text.update(
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        eos_token_id=IM_END,
        pad_token_id=ENDOFTEXT,
    )
    vision = dict(VISION if size != "tiny" else TINY_VISION, out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def build_model(size: str, device: str, attn: str = "sdpa") -> Any:
    """Qwen2.5-VL with random weights: bf16 on CUDA, fp32 on CPU."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = qwen25vl_config(size)
    cfg._attn_implementation = attn
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = ENDOFTEXT
    model.generation_config.eos_token_id = [IM_END, ENDOFTEXT]
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    return model


def build_processor(image_size: int) -> Any:
    """Qwen2.5-VL's processor with a small offline tokenizer (the 7B's vocabulary is larger; ids fit in it)."""
    import transformers

    from capdpo.models.tiny import QWEN_CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer("qwen")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    pixels = image_size * image_size
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=pixels, max_pixels=pixels
    )
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.padding_side = "left"
    return processor


@dataclass
class Shapes:
    image_side: int = 448  # pixels; 448 → 32×32 patches → 256 merged image tokens
    text_before: int = 20  # system + user header tokens before the image
    text_after: int = 12  # instruction tokens after the image


def image_tokens(shapes: Shapes, patch: int = 14, merge: int = 2) -> int:
    side = shapes.image_side // patch
    return (side // merge) ** 2


def prompt_tokens(shapes: Shapes) -> float:
    """Tokens of a prompt of `synthetic_batch`'s layout: the text before, vision start, image tokens, vision end, the
    instruction."""
    return shapes.text_before + shapes.text_after + image_tokens(shapes) + 2


def synthetic_batch(batch: int, shapes: Shapes, device: str, seed: int = 0, text_after: list[int] | None = None,
                    vocab: int = 150000) -> dict[str, Any]:  # fmt: skip
    """Processor-like inputs: [text][vision_start][image pads][vision_end][text], random text ids and pixels.

    `text_after` gives per-row instruction lengths (rows are then left-padded like the processor's output).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    side = shapes.image_side // 14
    n_img = image_tokens(shapes)
    lengths = text_after or [shapes.text_after] * batch
    rows = []
    for after in lengths:
        ids = torch.randint(1000, vocab, (shapes.text_before + after,), generator=g)
        rows.append(
            torch.cat(
                [
                    ids[: shapes.text_before],
                    torch.tensor([VISION_START] + [IMAGE_TOKEN] * n_img + [VISION_END]),
                    ids[shapes.text_before :],
                ]
            )  # fmt: skip
        )
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), ENDOFTEXT, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pixels = torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=g).to(dtype)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long().to(device),
        "pixel_values": pixels.to(device),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch).to(device),
    }


def repeat_rows(inputs: dict[str, Any], k: int) -> dict[str, Any]:
    """`synthetic_batch` inputs with every row (and its image) repeated `k` times in place: rows a, a, b, b, ..."""
    images = inputs["image_grid_thw"].shape[0]
    out = {key: v.repeat_interleave(k, 0) for key, v in inputs.items() if key != "pixel_values"}
    pixels = inputs["pixel_values"]
    out["pixel_values"] = pixels.view(images, -1, pixels.shape[-1]).repeat_interleave(k, 0).view(-1, pixels.shape[-1])
    return out


def hardware_rates(device: str, quick: bool = False) -> dict[str, float]:
    """Measured bf16 matmul rate (FLOP/s) and device memory copy bandwidth (bytes/s, read + write)."""
    import torch

    if not device.startswith("cuda"):
        return {"matmul_flops": float("nan"), "copy_bytes_per_s": float("nan")}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    iters = 5 if quick else 20
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * n**3 * iters / (time.perf_counter() - t)
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    bandwidth = 2 * src.numel() * iters / (time.perf_counter() - t)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def sustained_matmul_flops(device: str, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """bf16 FLOP/s of [m, k] x [k, n] GEMMs run back to back for about `seconds` (NaN off CUDA).

    `hardware_rates` times ~20 ms of square GEMMs, before the card heats up and its clock settles under the power
    limit; a prefill runs its GEMMs for seconds. This rate, at one of the prefill's own shapes, says how much of the
    gap to the floor the clock alone explains (reported beside the floor, never in place of it)."""
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.T
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b.T
        torch.cuda.synchronize()
        count += 10
    flops = 2 * m * k * n * count / (time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return flops


def param_counts(model: Any) -> dict[str, int]:
    """Matmul parameters by where they run: `vision` (patch embedding and blocks, on every patch),
    `vision_merger` (on every merged image token), `text_layers` (the decoder layers, on every token), `lm_head`
    (on the positions whose logits are needed); the embedding tables are lookups. `total` counts every parameter
    once (a tied head is the embedding)."""
    named = dict(model.named_parameters())
    visual = sum(p.numel() for n, p in named.items() if ".visual." in f".{n}")
    merger = sum(p.numel() for n, p in named.items() if ".visual.merger." in f".{n}")
    head_weight = model.get_output_embeddings().weight
    embed_weight = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = head_weight is embed_weight
    text_layers = total - visual - embed_weight.numel() - (0 if tied else head_weight.numel())
    return {
        "total": total, "vision": visual - merger, "vision_merger": merger, "text_layers": text_layers,
        "lm_head": head_weight.numel(),
    }  # fmt: skip


def attention_shapes(config: Any, shapes: Shapes) -> dict[str, float]:
    """What attention costs beyond the matmul parameters, for `config` (a Qwen-VL config) and one image of
    `shapes`: `text_width` (query heads x head size x layers: a query attending to one key costs 4 x this FLOPs,
    QK^T and PV) and `vision_flops` (every vision block's attention on one image: windowed blocks attend within
    their windows, the others over the whole image)."""
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    side = shapes.image_side // patch  # patches per side
    patches = side * side
    window = getattr(vision, "window_size", 0) // merge // patch  # merged tokens per window side (0: none)
    full_blocks, windowed_pairs = vision.depth, 0  # towers without windows attend over the whole image
    if window:
        full_blocks = len(set(vision.fullatt_block_indexes))
        merged = side // merge
        spans = [window] * (merged // window) + ([merged % window] if merged % window else [])  # edge windows smaller
        windowed_pairs = sum((a * b * merge * merge) ** 2 for a in spans for b in spans)
    pairs = full_blocks * patches**2 + (vision.depth - full_blocks) * windowed_pairs
    return {
        "text_width": text.num_hidden_layers * text.num_attention_heads * head_dim,
        "vision_flops": 4 * pairs * vision.hidden_size,
    }


def prefill_flops(prompt: float, shapes: Shapes, params: dict, attention: dict) -> float:
    """FLOPs to read one image and its prompt of `prompt` tokens (image tokens included) into a cache and get the
    last position's logits: the vision tower (blocks on every patch, merger on every image token, attention), the
    decoder layers on every prompt token with causal attention, and the head on the last token."""
    patches = image_tokens(shapes) * 4
    vision = 2 * params["vision"] * patches + 2 * params["vision_merger"] * image_tokens(shapes)
    causal_pairs = prompt * (prompt + 1) / 2
    text = 2 * params["text_layers"] * prompt + 4 * causal_pairs * attention["text_width"] + 2 * params["lm_head"]
    return vision + attention["vision_flops"] + text


def decode_flops(context: float, params: dict, attention: dict) -> float:
    """FLOPs of one decode step of one row whose new token attends to `context` keys (itself included)."""
    return 2 * (params["text_layers"] + params["lm_head"]) + 4 * context * attention["text_width"]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mean_seconds(fn: Any, device: str, repeat: int = 2, warmup: int = 1) -> float:
    """Seconds per call of `fn` over `repeat` calls, after `warmup` calls (the device synchronised around)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def profiler(cuda: bool, python: bool = False) -> Any:
    """A torch.profiler recording CPU and, on a GPU, CUDA activity (enter it as a context manager); `python` also
    records every Python call (slower, for `python_idle_table`)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, with_stack=python)


def operator_table(prof: Any, cuda: bool) -> str:
    """A finished profile's 60 costliest operators, by device time on a GPU (CPU time otherwise); on a GPU headed by
    how much of the recorded time the device was busy (the rest it waited on the host)."""
    key = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
    if not cuda:
        return table
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    if not kernels:
        return table
    start, end = min(e.time_range.start for e in events), max(e.time_range.end for e in events)
    busy = covered(kernels)
    # outermost operators of every thread: the backward runs on autograd's own thread
    ops = [(e.time_range.start, e.time_range.end, e.name) for e in events
           if e.device_type == DeviceType.CPU and e.cpu_parent is None]  # fmt: skip
    waits = idle_by_host_op(kernels, ops, start, end)
    lines = [f"  {ms / 1e3:8.1f} ms  {name}" for name, ms in waits[:25]]
    return (
        f"device busy {busy / 1e3:.1f} ms of the {(end - start) / 1e3:.1f} ms recorded ({busy / max(end - start, 1):.0%}); "
        f"the rest it waited on the host\n\ndevice idle, by the host's outermost operator running meanwhile:\n"
        + "\n".join(lines)
        + f"\n\n{table}"
    )


def idle_by_host_op(
    kernels: list[tuple[float, float]], ops: list[tuple[float, float, str]], start: float, end: float
) -> list[tuple[str, float]]:
    """How long the device sat idle between `start` and `end` while each host operator ran (outermost operators,
    (start, end, name); an operator of another thread running at the same moment is charged too), longest first;
    idle time with no operator running is Python's ("(no operator: Python)")."""
    gaps = idle_gaps(kernels, start, end)
    totals: dict[str, float] = {}
    ops = sorted(ops)
    longest = max((e - s for s, e, _ in ops), default=0.0)
    first = 0
    for g0, g1 in gaps:
        while first < len(ops) and ops[first][0] + longest <= g0:  # no operator before here reaches the gap
            first += 1
        inside = []
        for s, e, name in ops[first:]:
            if s >= g1:
                break
            if e > g0:
                inside.append((max(s, g0), min(e, g1)))
                totals[name] = totals.get(name, 0.0) + min(e, g1) - max(s, g0)
        python = (g1 - g0) - covered(inside)
        if python > 0:
            totals["(no operator: Python)"] = totals.get("(no operator: Python)", 0.0) + python
    return sorted(totals.items(), key=lambda kv: -kv[1])


DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def python_idle_table(trace: dict[str, Any], rows: int = 30) -> str:
    """Where the host's Python was while the device sat idle, from a Chrome trace that torch.profiler exported with
    `with_stack=True`: each Python function's idle time inclusive of its callees, and its own (not inside any of its
    callees), summed by function, longest first. Idle time counts between the first and last host event."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in DEVICE_EVENTS]
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation")]
    if not kernels or not host:
        return "no device or no host events in the trace\n"
    start = min(float(e["ts"]) for e in host)
    end = max(float(e["ts"]) + float(e["dur"]) for e in host)
    gaps = idle_gaps(kernels, start, end)
    gap_starts = [g[0] for g in gaps]
    prefix = [0.0]
    for g0, g1 in gaps:
        prefix.append(prefix[-1] + g1 - g0)

    def idle(t0: float, t1: float) -> float:
        """Idle time inside [t0, t1): whole gaps by prefix sums, the two partial ones at the ends by hand."""
        i = max(bisect.bisect_right(gap_starts, t0) - 1, 0)
        j = bisect.bisect_left(gap_starts, t1)
        if i >= j:
            return 0.0
        total = prefix[j] - prefix[i]
        total -= max(0.0, min(t0, gaps[i][1]) - gaps[i][0])  # the first gap's part before t0
        total -= max(0.0, gaps[j - 1][1] - max(t1, gaps[j - 1][0]))  # the last gap's part after t1
        return max(total, 0.0)

    calls = []  # (name, its id, its idle time)
    child_idle: dict[Any, float] = {}
    for e in host:
        if e.get("cat") != "python_function":
            continue
        args = e.get("args", {})
        key, wait = args.get("Python id", id(e)), idle(float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        calls.append((e["name"], key, wait))
        parent = args.get("Python parent id")
        if parent is not None:
            child_idle[parent] = child_idle.get(parent, 0.0) + wait
    by_incl: dict[str, float] = {}
    by_self: dict[str, float] = {}
    for name, key, wait in calls:
        by_incl[name] = by_incl.get(name, 0.0) + wait
        by_self[name] = by_self.get(name, 0.0) + max(wait - child_idle.get(key, 0.0), 0.0)
    total = prefix[-1]
    lines = [f"device idle {total / 1e3:.1f} ms of the {(end - start) / 1e3:.1f} ms recorded; by Python function:"]
    for title, table in (("own (not inside a callee)", by_self), ("inclusive of callees", by_incl)):
        lines.append(f"\n{title}:")
        for name, us in sorted(table.items(), key=lambda kv: -kv[1])[:rows]:
            lines.append(f"  {us / 1e3:8.1f} ms  {name}")
    return "\n".join(lines) + "\n"


def idle_gaps(kernels: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The stretches of [start, end) that no kernel (start, end) covers, in order."""
    gaps, reach = [], start
    for s, e in sorted(kernels) + [(end, end)]:
        if s > reach:
            gaps.append((reach, min(s, end)))
        reach = max(reach, e)
    return gaps


def covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if device.startswith("cuda") else 0,
    }
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def write_result(path: str | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
