"""MM-RLHF's `dpo_pairs.jsonl` (import only).

Columns: `prompt`, `chosen`, `rejected`, `image` (relative to `--image_root`, default the file's folder); optional
`reference_chosen_logp` / `reference_rejected_logp` (kept in `meta.reference_logps`), `chosen_reason`,
`rejected_reason`, `ls_factor`, scores (`score_chosen` / `score_rejected` or `chosen_score` / `rejected_score`).
Video rows and rows marked `is_tie` are skipped.
"""

from __future__ import annotations

from typing import Any

from capdpo.formats.rows import ImportContext, RowProblem, image_file, is_number, new_pair, prompt_text, text_of
from capdpo.records import PairRecord

REQUIRED = ("prompt", "chosen", "rejected", "image")
META = ("chosen_reason", "rejected_reason", "ls_factor")
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"))


def _scores(row: dict[str, Any]) -> tuple[float, float] | None:
    for chosen_key, rejected_key in SCORE_COLUMNS:
        c, r = row.get(chosen_key), row.get(rejected_key)
        if is_number(c) and is_number(r):
            return float(c), float(r)
    return None


def pair_of(record: dict[str, Any], ctx: ImportContext) -> PairRecord:
    """One MM-RLHF row as a pair."""
    if record.get("image") is None:
        raise RowProblem("video rows are not supported" if "video" in record else "no 'image'")
    if record.get("is_tie"):
        raise RowProblem("is_tie: chosen and rejected were rated equal")
    texts = {k: text_of(record.get(k)) for k in ("prompt", "chosen", "rejected")}
    bad = [k for k, v in texts.items() if v is None]
    if bad:
        raise RowProblem(f"'{bad[0]}' is missing or not a string")
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    if len(images) != 1 or not isinstance(images[0], str):
        raise RowProblem(f"{len(images)} images; a capdpo pair has exactly one image path")
    image, image_id = image_file(images[0], ctx)
    meta: dict[str, Any] = {
        "imported_from": "mmrlhf",
        "source": str(ctx.path),
        "row": ctx.row,
        "image_path": images[0],
    }
    meta.update({k: record[k] for k in META if record.get(k) is not None})
    ref = record.get("reference_chosen_logp"), record.get("reference_rejected_logp")
    if all(is_number(v) for v in ref):
        meta["reference_logps"] = {
            "chosen": float(ref[0]),
            "rejected": float(ref[1]),
            "from": "the row's reference_chosen_logp / reference_rejected_logp",
        }
        ctx.counts["with_reference_logps"] += 1
    elif any(v is not None for v in ref):
        ctx.counts["reference_logps_unreadable"] += 1
    return new_pair(
        image, image_id, prompt_text(texts["prompt"]), texts["chosen"], texts["rejected"], _scores(record), meta
    )
