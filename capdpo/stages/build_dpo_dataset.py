"""Stage 5: preference pairs from the scored candidates, split by image, exported for other trainers.

    python 5_build_dpo_dataset.py --config configs/demo.yaml [--mode sentence --min_gap 0.2 ...]

Reads `04_scores.jsonl` (refusing an unfinished one unless --allow_partial) and rebuilds `05_pairs.jsonl` and
`05_exports/` whole on every run: the stage is pure Python and takes seconds, and nothing is replaced before the
input has been read and checked in full.

From each scored sentence at most one pair is made:

1. Fragments are never chosen or rejected: after stripping surrounding quotes, a candidate that is a bare list
   marker ("2.", "-"), a list header (ends with ':') or shorter than `min_words` words is left out.
2. chosen = the highest-scoring candidate left, rejected = the lowest of the others. Ties are broken the same
   way every run: for chosen the original sentence wins (it is the strong model's own wording, the text the
   policy actually produces), then the alphabetically first text; for rejected a rewrite wins over the original
   (an original is never rejected in favour of an equally scored rewrite), then the alphabetically first text.
3. `context` mode (default): chosen/rejected are the whole description with the sentence replaced by the chosen
   / rejected candidate, so the completion answers the description prompt. `sentence` mode: the sentences before
   it are `assistant_prefix` (the start of the answer, part of the prompt) and the completions are single
   sentences.

Then, in this order, each counted in the stats: pairs whose two sentences are the same text up to case,
whitespace and trailing punctuation; pairs whose score gap is below `min_gap` (or zero); pairs whose chosen
sentence scores below `min_chosen_score`; with `max_length_ratio`,
pairs whose longer completion has more than ratio x the words of the shorter; duplicates (same image, prompt,
prefix, chosen and rejected: the one with the larger gap stays); beyond `max_pairs_per_image`, the pairs of an
image with the smallest gaps (ties: lower pair id stays). Images, never single pairs, go to the validation split:
a stable hash of (seed, image id) below `val_fraction`.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.formats.registry import write_exports
from capdpo.jsonl import write_jsonl
from capdpo.pairs.build import build_pairs, read_score_records
from capdpo.pairs.config import PairsConfig
from capdpo.pipeline import stage as stage_info
from capdpo.records import PairRecord
from capdpo.run import Stage
from capdpo.sections import load_config

EXPORT_DIR = "05_exports"


def _replace_exports(pairs: list[PairRecord], cfg: PairsConfig, run_dir: Path) -> dict[str, list[str]]:
    """Write the exports into a fresh folder, then swap it in: no stale file of an earlier run survives."""
    final, tmp, old = run_dir / EXPORT_DIR, run_dir / f"{EXPORT_DIR}.tmp", run_dir / f"{EXPORT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = write_exports(pairs, tmp, cfg.exports, cfg.dataset_name)
    except BaseException:  # e.g. a full disk: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return written


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Build `05_pairs.jsonl` and `05_exports/` from stage 4's scores; return the stats."""
    sec: PairsConfig = cfg.section
    stage = Stage("pairs", cfg)
    stage.claim()  # one run of this stage per run directory at a time
    source = stage.run_dir / stage_info("validate").output
    partial = not source.with_name(source.name.removesuffix(".jsonl") + ".done").exists()
    # Read and check everything before any output is touched: bad input never costs finished work.
    records = read_score_records(stage.read_numbered("validate"), source)
    pairs, filtered = build_pairs(records, sec, cfg.common.seed, show_progress=True)

    stage.done_path.unlink(missing_ok=True)
    stage.write_meta()
    write_jsonl(stage.output, (p.to_dict() for p in pairs))
    exports = _replace_exports(pairs, sec, stage.run_dir)

    splits = Counter(p.split for p in pairs)
    image_splits = {split: len({p.image_id for p in pairs if p.split == split}) for split in sorted(splits)}
    missing_images = sorted({p.image for p in pairs if not os.path.exists(p.image)})
    gaps = [p.meta["gap"] for p in pairs]
    removed = filtered["removed"]
    stats = {
        "mode": sec.mode,
        "input_partial": partial,
        "sentences": len(records),
        "candidates": sum(len(r.candidates) for r in records),
        "images_in": len({r.image_id for r in records}),
        **filtered,
        "pairs": len(pairs),
        "pairs_by_split": dict(sorted(splits.items())),
        "images_by_split": image_splits,
        "mean_gap": sum(gaps) / len(gaps) if gaps else 0.0,
        "missing_images": len(missing_images),
        "exports": exports,
    }
    summary = (
        f"{len(records)} scored sentences of {stats['images_in']} images gave {len(pairs)} {sec.mode}-mode pairs "
        f"({splits.get('train', 0)} train / {splits.get('val', 0)} validation, split by image; mean score gap "
        f"{stats['mean_gap']:.3f}). Removed: {removed['fragment_candidates']} fragment candidates, "
        f"{removed['sentences_without_two_candidates']} sentences without two usable candidates, "
        f"{removed['same_text_pairs']} same-text pairs, {removed['small_gap_pairs']} pairs with a gap below "
        f"{sec.min_gap}, {removed['low_chosen_score_pairs']} with a chosen score below {sec.min_chosen_score}, "
        f"{removed['unbalanced_length_pairs']} length-unbalanced, {removed['duplicate_pairs']} "
        f"duplicates, {removed['over_image_cap_pairs']} over the cap of {sec.max_pairs_per_image} per image."
        + (f" Exports ({', '.join(sec.exports)}) in {stage.run_dir / EXPORT_DIR}." if sec.exports else "")
        + (" The input stage had not finished (--allow_partial)." if partial else "")
        + (
            f" Warning: {len(missing_images)} image file(s) not found, e.g. {missing_images[0]}."
            if missing_images
            else ""
        )
        + (" No pairs: lower min_gap or check the scores." if records and not pairs else "")
    )
    return stage.finish(stats, summary)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("pairs", a, __doc__)), argv)
