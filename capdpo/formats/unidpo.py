"""Uni-DPO's alpaca-style data with scores (`unidpo_{split}.json`; Uni-DPO trains through LLaMA-Factory).

A row holds `instruction` ("<image>prompt"), `input`, `chosen`, `rejected`, `images`, `score_chosen`,
`score_rejected`; `dataset_info.json` gets an entry for it too. Scores are capdpo's, in [0, 1]; Uni-DPO's
published defaults (tau_good 2.5 ...) assume a larger scale. On import a non-empty `input` joins the instruction
on a new line, as LLaMA-Factory does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capdpo.formats.rows import (
    IMAGE_TAG,
    ImportContext,
    RowProblem,
    by_split,
    completions,
    field_of,
    image_path,
    pair_from_row,
    provenance_columns,
    single_image,
    without_image_tags,
)
from capdpo.jsonl import write_json
from capdpo.records import PairRecord

REQUIRED = ("instruction", "chosen", "rejected", "images")


def row_of(pair: PairRecord, image_root: str | None = None) -> dict[str, Any]:
    """One pair in Uni-DPO's alpaca-style format with scores."""
    chosen, rejected = completions(pair)
    return {
        "instruction": IMAGE_TAG + pair.prompt,
        "input": "",
        "chosen": chosen,
        "rejected": rejected,
        "images": [image_path(pair.image, image_root)],
        **provenance_columns(pair),  # includes score_chosen / score_rejected, which Uni-DPO reads
    }


def dataset_info(split: str) -> dict[str, Any]:
    """The `dataset_info.json` entry of one split of the Uni-DPO export."""
    return {
        "file_name": f"unidpo_{split}.json",
        "formatting": "alpaca",
        "ranking": True,
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "chosen": "chosen",
            "rejected": "rejected",
            "images": "images",
            "score_chosen": "score_chosen",
            "score_rejected": "score_rejected",
        },
    }


def export(
    pairs: list[PairRecord], out_dir: Path, dataset_name: str, image_root: str | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """Write `unidpo_{split}.json` per split; return the files and their `dataset_info.json` entries."""
    files, info = [], {}
    for split, group in by_split(pairs).items():
        path = out_dir / f"unidpo_{split}.json"
        write_json(path, [row_of(p, image_root) for p in group])
        files.append(path)
        info[f"{dataset_name}_unidpo_{split}"] = dataset_info(split)
    return files, info


def pair_of(row: dict[str, Any], ctx: ImportContext) -> PairRecord:
    """One alpaca ranking row (optional `score_chosen` / `score_rejected`) as a pair."""
    image = single_image(field_of(row, "images"), ctx)
    prompt = "\n".join(t for t in (row.get("instruction") or "", row.get("input") or "") if t)
    chosen, rejected = field_of(row, "chosen"), field_of(row, "rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RowProblem("'chosen' and 'rejected' must be strings")
    return pair_from_row(
        row,
        image=image,
        prompt=without_image_tags(prompt, 1),
        chosen=chosen,
        rejected=rejected,
        prefix="",
        source="unidpo",
    )
