"""Validation throughput (stage 4): the original pipeline's rating prompt vs capdpo's yes/no scoring, same images.

    python bench/validate.py --out bench/results/validate_h200.json     # full-size Qwen2.5-VL-3B, GPU
    python bench/validate.py --tiny                                      # CPU smoke test, seconds

Baseline (what the original pipeline does per candidate): a 634-token 0–100 rating prompt (image included) and 3
sampled tokens through `model.generate`, batch 64. capdpo: P(yes)/(P(yes)+P(no)) from one forward pass per
candidate; first with a full forward per candidate (batch 64), then with the image and the shared start of the
instruction computed once per image and only each candidate's ~40-token suffix run on that cache. Each image has
`--candidates` candidates (e.g. 8 sentences × 5 candidates), as in a real run. Those rows start from token ids; the
last row ("stage path") starts from images on disk and candidate sentences and calls `Engine.score` as stage 4 does,
so the host's chat templates, tokenisation and image processing count too (its prompt is the real yes/no prompt,
not the synthetic one above, so its rate is not the same measure as the row before it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ENDOFTEXT,
    Shapes,
    attention_shapes,
    build_model,
    build_processor,
    environment,
    hardware_rates,
    operator_table,
    param_counts,
    prefill_flops,
    profiler,
    sync,
    synthetic_batch,
    table,
    write_result,
)

# stand-ins for the yes/no answer tokens ("Yes", " yes", ... in Qwen's vocabulary) that stage 4 reads
ANSWER_IDS = [9454, 9693, 14004, 2753, 2152, 5664]


def floor_candidates_per_s(
    candidates: int,
    prompt_tokens: int,
    suffix_tokens: int,
    shapes: Shapes,
    params: dict,
    rates: dict,
    attention: dict,
) -> float:
    """Candidates/s if the shared-prefix path's FLOPs ran at the measured matmul rate: per image, the vision tower
    and the text model on the prefix once (`bench.common.prefill_flops`), then the decoder layers on each
    candidate's suffix (attending to the prefix and causally to itself) and the LM head on each candidate's last
    token (the cache reads left out, so this is a bound)."""
    prefix = prompt_tokens - suffix_tokens
    suffix_pairs = suffix_tokens * prefix + suffix_tokens * (suffix_tokens + 1) / 2
    per_candidate = (
        2 * params["text_layers"] * suffix_tokens + 4 * suffix_pairs * attention["text_width"] + 2 * params["lm_head"]
    )
    # prefill_flops counts the head on the prefix's last token, which this path never needs
    flops = prefill_flops(prefix, shapes, params, attention) - 2 * params["lm_head"] + candidates * per_candidate
    return candidates / (flops / rates["matmul_flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="3b", choices=["7b", "3b", "tiny"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--images", type=int, default=16, help="images scored by capdpo's paths")
    parser.add_argument("--candidates", type=int, default=40, help="candidates per image")
    parser.add_argument("--baseline-batch", type=int, default=64)
    parser.add_argument("--baseline-candidates", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="capdpo suffixes / prompts per forward pass")
    parser.add_argument("--images-per-pass", type=int, default=32, help="image prefixes per forward pass")
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="BATCHxIMAGES",
        help="also time the shared-prefix path at these suffixes per pass x images per prefix pass (e.g. 1280x32)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--profile",
        default=None,
        help="Also time the prefix and suffix passes apart and write an operator table here.",
    )
    args = parser.parse_args()

    import torch

    from capdpo.generation.prefix import PrefixGroup, SharedPrefixScorer, shared_prefix_length
    from capdpo.models.patches import tune_for_cuda_inference, use_grouped_vision_attention

    if args.tiny:
        args.size, args.images, args.candidates, args.baseline_candidates, args.baseline_batch = "tiny", 2, 6, 8, 4
        args.batch, args.images_per_pass = 8, 2
        shapes = Shapes(image_side=56)
    else:
        shapes = Shapes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.size, device)
    rates = hardware_rates(device, quick=args.tiny)
    params = param_counts(model)
    attention = attention_shapes(model.config, shapes)
    rows: list[tuple[str, ...]] = [("path", "candidates", "seconds", "candidates/s", "vs baseline")]
    result = {"env": environment(device), "size": args.size}

    # -- baseline: 634-token rating prompt, 3 sampled tokens ----------------------------------------------
    rating_text = 634 - 256 - 2 - shapes.text_before if not args.tiny else 40

    def rating_batches(n: int, seed: int) -> list[dict]:
        b = args.baseline_batch
        return [synthetic_batch(b, Shapes(shapes.image_side, shapes.text_before, rating_text), device, seed + i)
                for i in range(max(1, n // b))]  # fmt: skip

    def plain_rating(inputs: dict) -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=True, top_p=1.0, temperature=1.0)

    for inputs in rating_batches(args.baseline_batch, 100):
        plain_rating(inputs)
    data = rating_batches(args.baseline_candidates, 0)
    sync(device)
    start = time.perf_counter()
    for inputs in data:
        plain_rating(inputs)
    sync(device)
    seconds = time.perf_counter() - start
    n = args.baseline_batch * len(data)
    base_rate = n / seconds
    result["baseline"] = {"candidates": n, "seconds": seconds, "candidates_per_s": base_rate, "prompt_tokens": 634}
    rows.append(("original rating prompt + generate(3)", str(n), f"{seconds:.2f}", f"{base_rate:.1f}", "1.00x"))
    del data

    # -- capdpo yes/no: one full forward per candidate ----------------------------------------------------
    use_grouped_vision_attention()  # capdpo's model loading applies these; the baseline above ran without
    if device == "cuda":
        tune_for_cuda_inference(model)
    head, suffix = 15, 40
    yesno_shapes = Shapes(shapes.image_side, shapes.text_before, head + suffix)

    def full_forward(inputs: dict) -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)

    total = args.images * args.candidates
    batches = [synthetic_batch(args.batch, yesno_shapes, device, 200 + i) for i in range(max(1, total // args.batch))]
    full_forward(batches[0])
    sync(device)
    start = time.perf_counter()
    for inputs in batches:
        full_forward(inputs)
    sync(device)
    seconds = time.perf_counter() - start
    n = args.batch * len(batches)
    result["capdpo_full_forward"] = {"candidates": n, "seconds": seconds, "candidates_per_s": n / seconds}
    rows.append(("capdpo yes/no, full forward", str(n), f"{seconds:.2f}", f"{n / seconds:.1f}",
                 f"{n / seconds / base_rate:.2f}x"))  # fmt: skip
    del batches

    # -- capdpo yes/no: image + instruction once per image, suffixes on the shared cache -----------------
    lm = SimpleNamespace(
        model=model,
        device=torch.device(device),
        tokenizer=SimpleNamespace(pad_token_id=ENDOFTEXT),
        processor=SimpleNamespace(image_token=None),
    )
    scorer = SharedPrefixScorer(lm, images_per_pass=args.images_per_pass)
    groups = []
    for i in range(args.images):
        first = synthetic_batch(1, Shapes(shapes.image_side, shapes.text_before, head), device, 300 + i)
        prefix = first["input_ids"][0].tolist()
        g = torch.Generator().manual_seed(i)
        ids = [prefix + torch.randint(1000, 150000, (suffix,), generator=g).tolist() for _ in range(args.candidates)]
        zeros = [0] * len(ids)
        groups.append(
            PrefixGroup(first, ids, zeros, shared_prefix_length(ids, zeros), [(i, j) for j in range(len(ids))])
        )

    def shared(chunk: list, by: Any = scorer, batch: int = args.batch) -> None:
        # as stage 4 does: only the answer tokens' log-probs leave the GPU (yes/no: six ids)
        assert len(by.score_groups(chunk, batch, keep=ANSWER_IDS)) == sum(len(g.ids) for g in chunk)

    def timed_shared(by: Any, batch: int) -> float:
        # the warm-up on the same groups: the compiled kernels meet the timed passes' sizes before the clock starts
        # (a size they have not met recompiles them once)
        shared(groups, by, batch)
        sync(device)
        start = time.perf_counter()
        shared(groups, by, batch)
        sync(device)
        return time.perf_counter() - start

    seconds = timed_shared(scorer, args.batch)
    n = args.images * args.candidates
    rate = n / seconds
    result["capdpo_shared_prefix"] = {"candidates": n, "seconds": seconds, "candidates_per_s": rate,
                                      "candidates_per_image": args.candidates}  # fmt: skip
    result["speedup"] = rate / base_rate
    floor = floor_candidates_per_s(args.candidates, len(groups[0].ids[0]), suffix, shapes, params, rates, attention)
    result["capdpo_shared_prefix"]["floor_candidates_per_s"] = floor
    result["share_of_floor"] = rate / floor
    result["rates"] = rates
    rows.append(("capdpo yes/no, shared image prefix", str(n), f"{seconds:.2f}", f"{rate:.1f}",
                 f"{rate / base_rate:.2f}x"))  # fmt: skip
    result["capdpo_shared_prefix"]["shape"] = {"batch": args.batch, "images_per_pass": args.images_per_pass}
    result["capdpo_shared_prefix_also"] = []
    for shape in args.also:
        batch, per_pass = (int(x) for x in shape.lower().split("x"))
        other = timed_shared(SharedPrefixScorer(lm, images_per_pass=per_pass), batch)
        result["capdpo_shared_prefix_also"].append(
            {"batch": batch, "images_per_pass": per_pass, "seconds": other, "candidates_per_s": n / other}
        )
        rows.append((f"  same, {batch} suffixes / {per_pass} images per pass", str(n), f"{other:.2f}",
                     f"{n / other:.1f}", f"{n / other / base_rate:.2f}x"))  # fmt: skip
    if args.profile:
        result["capdpo_shared_prefix"]["split_seconds"] = _split_and_profile(
            scorer, lambda: shared(groups), device, Path(args.profile)
        )

    # -- capdpo yes/no as stage 4 runs it: requests in, so chat templates, tokenisation and image processing count -
    stage = _stage_path(model, args, shapes, device)
    result["capdpo_stage_path"] = stage
    rows.append(("capdpo yes/no, stage path (requests in)", str(stage["candidates"]), f"{stage['seconds']:.2f}",
                 f"{stage['candidates_per_s']:.1f}", f"{stage['candidates_per_s'] / base_rate:.2f}x"))  # fmt: skip
    print(table(rows))
    print(f"\ncapdpo / original method: {result['speedup']:.1f}x candidates/s (target >= 40x); floor {floor:.0f} "
          f"candidates/s, share of the floor: {result['share_of_floor']:.0%} (target >= 50%)")  # fmt: skip
    write_result(args.out, result)


def _stage_path(model: Any, args: Any, shapes: Shapes, device: str) -> dict[str, Any]:
    """Time `Engine.score` on validation requests built from images on disk and candidate sentences, as stage 4
    calls it: the host work of each image (chat templates, tokenisation, image processing) counts. The processor is
    Qwen2.5-VL's with a small offline tokenizer, so the model's special-token ids follow it while this runs."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from capdpo.generation.engine import Engine
    from capdpo.models.loading import LoadedModel
    from capdpo.validation.config import ValidateConfig
    from capdpo.validation.validator import Validator

    processor = build_processor(shapes.image_side)
    tokens = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    saved = {key: getattr(model.config, key) for key in tokens}
    words = ("a red ball sits on the wooden table near the open window while two small dogs play on the green grass "
             "under a tall tree beside an old blue car").split()  # fmt: skip

    def sentence(image: int, candidate: int) -> str:
        n = 10 + (image + candidate) % 12
        return " ".join(words[(image * 7 + candidate * 3 + k) % len(words)] for k in range(n)).capitalize() + "."

    try:
        for key, token in tokens.items():
            setattr(model.config, key, processor.tokenizer.convert_tokens_to_ids(token))
        lm = LoadedModel(model, processor, "bench", torch.device(device), model.dtype, "qwen2_5_vl")
        validator = Validator(lm, ValidateConfig(methods=["yesno"]))
        engine = Engine(lm, decoder="hf", images_per_pass=args.images_per_pass)
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for i in range(args.images + 2):
                paths.append(f"{folder}/image{i}.png")
                side = shapes.image_side
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])

            def requests_of(first: int, count: int) -> list[Any]:
                return [
                    job.request
                    for i in range(first, first + count)
                    for job in validator.jobs(f"s{i}", paths[i], [sentence(i, c) for c in range(args.candidates)])
                ]

            engine.score(requests_of(args.images, 2), args.batch, keep=validator.reads())  # warm-up, other images
            requests = requests_of(0, args.images)
            sync(device)
            start = time.perf_counter()
            scored = engine.score(requests, args.batch, keep=validator.reads())
            sync(device)
            seconds = time.perf_counter() - start
    finally:
        for key, value in saved.items():
            setattr(model.config, key, value)
    assert len(scored) == len(requests)
    return {"candidates": len(requests), "seconds": seconds, "candidates_per_s": len(requests) / seconds}


def _split_and_profile(scorer: Any, run: Any, device: str, out: Path) -> dict[str, float]:
    """One more run of `run` with the scorer's prefix and suffix passes timed apart (synchronised), then one under
    torch.profiler whose operator table (by device time) goes to `out`."""
    split = {"prefix": 0.0, "suffixes": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            value = fn(*a, **k)
            sync(device)
            split[name] += time.perf_counter() - start
            return value

        return wrapper

    scorer._prefill, scorer._suffixes = timed("prefix", scorer._prefill), timed("suffixes", scorer._suffixes)
    run()
    del scorer._prefill, scorer._suffixes
    cuda = device.startswith("cuda")
    with profiler(cuda) as prof:
        run()
        sync(device)
    out.write_text(operator_table(prof, cuda) + "\n")
    print(f"prefix passes {split['prefix']:.2f} s, suffix passes {split['suffixes']:.2f} s; profile: {out}")
    return split


if __name__ == "__main__":
    main()
