"""Where the time goes: prefill (vision + text) vs decode for captioning, and the parts of shared-prefix scoring.

python bench/breakdown.py --out bench/results/profile_h200.json    # GPU
python bench/breakdown.py --tiny                                    # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ENDOFTEXT,
    Shapes,
    build_model,
    environment,
    mean_seconds,
    sync,
    synthetic_batch,
    write_result,
)


def top_ops(fn, device: str, n: int = 25) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=60)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=60)
    del torch
    return [table, cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=["captioning", "validation"], default=None)
    parser.add_argument(
        "--skip-tunings", action="store_true", help="apply the CUDA tunings at once instead of timing each one"
    )
    args = parser.parse_args()

    import torch

    from capdpo.models.patches import use_grouped_vision_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = Shapes(image_side=56) if args.tiny else Shapes()
    size7, size3 = ("tiny", "tiny") if args.tiny else ("7b", "3b")
    batch = 4 if args.tiny else args.batch
    use_grouped_vision_attention()
    result = {"env": environment(device), "batch": batch}

    if args.only != "validation":
        captioning(result, size7, shapes, batch, device, args.skip_tunings)
    if args.only != "captioning":
        validation(result, size3, shapes, device)
    write_result(args.out, {k: v for k, v in result.items() if not k.endswith("top_ops")})


def captioning(result: dict, size7: str, shapes: Shapes, batch: int, device: str, skip_tunings: bool = False) -> None:
    import torch

    from capdpo.generation.sampling import Generation
    from capdpo.generation.static_decoder import StaticDecoder
    from capdpo.models import patches as models

    model = build_model(size7, device)
    inputs = synthetic_batch(batch, shapes, device, seed=1)

    def run_vision():
        return model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

    # capdpo's CUDA inference tunings (models.tune_for_cuda_inference, all of them), timed one at a time
    steps = [("none", None), ("linear_patch_embedding", models.linear_patch_embedding),
             ("pad_vision_mlp", models.pad_vision_mlp), ("fuse_vision_elementwise", models.fuse_vision_elementwise),
             ("fuse_text_elementwise", models.fuse_text_elementwise)]  # fmt: skip
    if skip_tunings:
        steps = [("all", models.tune_for_cuda_inference)]
    with torch.inference_mode():
        reference = run_vision()
        reference = getattr(reference, "pooler_output", reference)
        for name, tune in steps:
            if tune is not None and device == "cuda":
                tune(model)
            seconds = mean_seconds(run_vision, device)
            full = mean_seconds(lambda: model(**inputs, use_cache=False, logits_to_keep=1), device)
            result.setdefault("vision_tunings_s", {})[name] = seconds
            result.setdefault("prefill_tunings_s", {})[name] = full
            out = getattr(run_vision(), "pooler_output", None)
            out = run_vision() if out is None else out
            diff = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            print(f"after {name}: vision {seconds:.3f} s, full prefill {full:.3f} s "
                  f"(relative difference of the vision features vs untuned: {diff:.1e})", flush=True)  # fmt: skip
        vision = mean_seconds(run_vision, device)
        prefill = mean_seconds(lambda: model(**inputs, use_cache=False, logits_to_keep=1), device)
        rope = mean_seconds(
            lambda: model.model.get_rope_index(
                inputs["input_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            ),  # fmt: skip
            device,
        )
    lm = SimpleNamespace(model=model, device=torch.device(device))
    steps = {}
    for graph in (True, False):
        decoder = StaticDecoder(lm, use_cuda_graph=graph and device == "cuda")
        run = {}
        for tokens in (1, 33):
            gen = Generation(max_new_tokens=tokens)
            run[tokens] = mean_seconds(
                lambda g=gen, d=decoder: d.generate(inputs, g, list(range(batch)), [], ENDOFTEXT), device, 1
            )
        steps[graph] = (run[33] - run[1]) / 32 * 1000
    result["captioning"] = {
        "vision_s": vision, "prefill_s": prefill, "get_rope_index_s": rope, "decode_step_ms": steps[True],
        "decode_step_eager_ms": steps[False], "prefill_plus_1_token_s": run[1],
    }  # fmt: skip
    print(f"captioning 7B, batch {batch}: vision {vision:.3f} s, full prefill {prefill:.3f} s "
          f"(get_rope_index {rope:.3f} s), decode step {steps[True]:.1f} ms ({steps[False]:.1f} ms eager)")  # fmt: skip
    with torch.inference_mode():
        sections = {
            "vision": lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]),
            "prefill": lambda: model(**inputs, use_cache=False, logits_to_keep=1),
            "static decoder, prefill + 1 token": lambda: decoder.generate(
                inputs, Generation(max_new_tokens=1), list(range(batch)), [], ENDOFTEXT
            ),
            "decode (eager, 9 tokens)": lambda: decoder.generate(
                inputs, Generation(max_new_tokens=9), list(range(batch)), [], ENDOFTEXT
            ),
        }
        sections["decode steps only (eager, 4 steps)"] = decode_steps(model, inputs, device)
        for name, fn in sections.items():
            tables = top_ops(fn, device)
            print(f"--- {name}, by device time ---\n" + tables[0] + f"\n--- {name}, by CPU time ---\n" + tables[1])
            result[f"{name}_top_ops"] = tables


def decode_steps(model, inputs: dict, device: str):
    """A function running 4 bare decode steps (text decoder + head on a filled static cache), for profiling."""
    import torch
    from transformers import StaticCache

    batch, prompt = inputs["input_ids"].shape
    cache = StaticCache(config=model.config, max_cache_len=prompt + 8)
    model.model.rope_deltas = None
    model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    mask = torch.ones(batch, prompt + 8, dtype=inputs["attention_mask"].dtype, device=device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.full((3, batch, 1), prompt, dtype=torch.long, device=device)
    cache_position = torch.tensor([prompt], device=device)

    def run():
        for _ in range(4):
            hidden = model.model.language_model(
                inputs_embeds=model.get_input_embeddings()(token), position_ids=position, attention_mask=mask,
                past_key_values=cache, cache_position=cache_position, use_cache=True,
            ).last_hidden_state  # fmt: skip
            model.lm_head(hidden[:, -1]).float()

    return run


def validation(result: dict, size3: str, shapes: Shapes, device: str) -> None:
    import torch

    from capdpo.generation.prefix import PrefixGroup, SharedPrefixScorer

    model = build_model(size3, device)
    lm = SimpleNamespace(model=model, device=torch.device(device), tokenizer=SimpleNamespace(pad_token_id=ENDOFTEXT),
                         processor=SimpleNamespace(image_token=None))  # fmt: skip
    scorer = SharedPrefixScorer(lm)
    groups = []
    for i in range(16):
        first = synthetic_batch(1, Shapes(shapes.image_side, shapes.text_before, 15), device, 3 + i)
        prefix = first["input_ids"][0].tolist()
        g = torch.Generator().manual_seed(i)
        ids = [prefix + torch.randint(1000, 150000, (40,), generator=g).tolist() for _ in range(40)]
        groups.append(PrefixGroup(first, ids, [0] * 40, len(prefix), list(range(40))))
    with torch.inference_mode():
        t_prefill = mean_seconds(lambda: scorer._prefill(groups), device)
        t_all = mean_seconds(lambda: scorer.score_groups(groups, 256), device)
    result["validation"] = {"prefill_16_images_s": t_prefill, "16_images_640_candidates_s": t_all}
    print(f"validation 3B, 16 images x 40 candidates: prefixes {t_prefill * 1000:.1f} ms, all {t_all * 1000:.1f} ms")
    with torch.inference_mode():
        tables = top_ops(lambda: scorer.score_groups(groups, 256), device)
    print("--- validation, by device time ---\n" + tables[0] + "\n--- by CPU time ---\n" + tables[1])


if __name__ == "__main__":
    main()
