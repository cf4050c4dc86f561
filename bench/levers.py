"""Captioning levers one at a time (7B, 448x448 images, batch 256): Qwen-VL rope positions (the model's
`get_rope_index` vs `capdpo.generation.rope`), the prefill with each, the fused language-model elementwise kernels, and a bare
decode step (CUDA graph) at 1024 and 2048 rows with and without them, plus a profile of one eager step.

    python bench/levers.py > bench/results/levers_h200.log     # GPU, ~2 min
    python bench/levers.py --tiny                               # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Shapes, build_model, mean_seconds, sync, synthetic_batch  # noqa: E402


def section(fn) -> None:
    """Run one measurement; a failure is printed and the next one runs."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - a probe reports every part it can
        traceback.print_exc()
    sys.stdout.flush()


def rope_ms(model, inputs: dict, device: str) -> None:
    import torch

    from capdpo.generation.rope import mrope_positions

    def theirs():
        return model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"])  # fmt: skip

    ref, ours = theirs(), mrope_positions(model, inputs)
    print("rope equal:", torch.equal(ref[0], ours[0]), torch.equal(ref[1], ours[1]))
    t_ref, t_ours = mean_seconds(theirs, device), mean_seconds(lambda: mrope_positions(model, inputs), device)
    batch = inputs["input_ids"].shape[0]
    print(f"get_rope_index {t_ref * 1000:.1f} ms, mrope_positions {t_ours * 1000:.2f} ms (batch {batch})")


def prefill_s(model, inputs: dict, device: str, tag: str) -> None:
    from capdpo.generation.rope import mrope_positions

    pos = mrope_positions(model, inputs)[0]
    t0 = mean_seconds(lambda: model(**inputs, use_cache=False, logits_to_keep=1), device)
    t1 = mean_seconds(lambda: model(**inputs, position_ids=pos, use_cache=False, logits_to_keep=1), device)
    batch = inputs["input_ids"].shape[0]
    print(f"[{tag}] prefill {batch} rows: model's positions {t0:.3f} s, batched positions {t1:.3f} s")


def decode_step_ms(model, rows: int, prompt: int, device: str, tag: str, profile: bool = False) -> None:
    """One decode step of `rows` rows on a static cache of prompt + 128 positions, eager and as a CUDA graph."""
    import torch
    from transformers import StaticCache

    from capdpo.generation.static_decoder import _capture

    total = prompt + 128
    cache = StaticCache(config=model.config, max_cache_len=total)
    mask = torch.ones(rows, total, dtype=torch.long, device=device)
    token = torch.zeros(rows, dtype=torch.long, device=device)
    pos = torch.full((3, rows, 1), prompt, dtype=torch.long, device=device)
    cache_position = torch.tensor([prompt], device=device)
    state = {}

    def step():
        hidden = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(token.view(rows, 1)), position_ids=pos, attention_mask=mask,
            past_key_values=cache, cache_position=cache_position, use_cache=True,
        ).last_hidden_state  # fmt: skip
        state["logits"] = model.lm_head(hidden[:, -1]).float()

    step()
    t_eager = mean_seconds(step, device, 3)
    graph = _capture(step) if device == "cuda" else None
    t_graph = mean_seconds(graph.replay, device, 10) if graph else float("nan")
    t_select = mean_seconds(lambda: state["logits"].argmax(-1), device, 10)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0
    print(f"[{tag}] decode {rows} rows: eager {t_eager * 1000:.1f} ms, graph {t_graph * 1000:.1f} ms, "
          f"argmax {t_select * 1000:.2f} ms; peak {mem:.1f} GiB")  # fmt: skip
    if profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    args = parser.parse_args()

    import torch

    from capdpo.models import patches as models

    device = "cpu" if args.tiny else "cuda"
    size, batch, shapes = ("tiny", 4, Shapes(image_side=56)) if args.tiny else ("7b", 256, Shapes())
    decode_rows = [4, 8] if args.tiny else [1024, 2048]
    model = build_model(size, device)
    models.use_grouped_vision_attention()
    if not args.tiny:  # the vision tunings of tune_for_cuda_inference, so only the text levers differ below
        models.linear_patch_embedding(model)
        models.pad_vision_mlp(model)
        models.fuse_vision_elementwise(model)
    inputs = synthetic_batch(batch, shapes, device, seed=1)
    prompt = inputs["input_ids"].shape[1]

    with torch.inference_mode():
        section(lambda: rope_ms(model, inputs, device))
        section(lambda: prefill_s(model, inputs, device, "vision fused"))
        for rows in decode_rows:
            section(lambda r=rows: decode_step_ms(model, r, prompt, device, "unfused", profile=r == decode_rows[0]))
            torch.cuda.empty_cache() if device == "cuda" else None
        n = models.fuse_text_elementwise(model, backend="eager" if args.tiny else "inductor")
        start = time.perf_counter()
        section(lambda: model(**inputs, use_cache=False, logits_to_keep=1))
        sync(device)
        print(f"fused {n} text modules; first prefill (compile) {time.perf_counter() - start:.1f} s")
        section(lambda: prefill_s(model, inputs, device, "vision+text fused"))
        for rows in decode_rows:
            section(lambda r=rows: decode_step_ms(model, r, prompt, device, "text fused"))
            torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
