"""LLaMA-Factory sharegpt ranking data (`{dataset_name}_{split}.json` + `dataset_info.json`).

A row holds `conversations` ([{"from": "human", "value": "<image>prompt"}]), `chosen` / `rejected`
({"from": "gpt", "value": ...}) and `images` ([path]); `dataset_info.json` beside it holds one entry per split
(`"ranking": true`). On import, a `dataset_info.json` entry for the file may name other columns and tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.formats.rows import (
    IMAGE_TAG,
    ImportContext,
    RowProblem,
    by_split,
    completions,
    dataset_info_entry,
    field_of,
    image_path,
    pair_from_row,
    provenance_columns,
    rejected_image_columns,
    rejected_image_of,
    single_image,
    without_image_tags,
)
from capdpo.jsonl import write_json
from capdpo.records import PairRecord

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
COLUMNS = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}
REQUIRED = tuple(COLUMNS.values())


def row_of(pair: PairRecord, image_root: str | None = None) -> dict[str, Any]:
    """One pair as LLaMA-Factory sharegpt ranking data."""
    chosen, rejected = completions(pair)
    return {
        "conversations": [{"from": "human", "value": IMAGE_TAG + pair.prompt}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
        "images": [image_path(pair.image, image_root)],
        **rejected_image_columns(pair, image_root),
        **provenance_columns(pair),
    }


def dataset_info(dataset_name: str, split: str) -> dict[str, Any]:
    """The `dataset_info.json` entry of one split of the sharegpt export."""
    return {
        "file_name": f"{dataset_name}_{split}.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": dict(COLUMNS),
        "tags": dict(SHAREGPT_TAGS),
    }


def export(
    pairs: list[PairRecord], out_dir: Path, dataset_name: str, image_root: str | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """Write `{dataset_name}_{split}.json` per split; return the files and their `dataset_info.json` entries."""
    files, info = [], {}
    for split, group in by_split(pairs).items():
        path = out_dir / f"{dataset_name}_{split}.json"
        write_json(path, [row_of(p, image_root) for p in group])
        files.append(path)
        info[f"{dataset_name}_{split}"] = dataset_info(dataset_name, split)
    return files, info


def layout(ctx: ImportContext) -> tuple[dict[str, str], dict[str, str]]:
    """(columns, tags) of the file: the defaults, or what its `dataset_info.json` entry names."""
    entry = dataset_info_entry(ctx.path, ctx.dataset_info)
    if entry and (entry.get("formatting", "alpaca") != "sharegpt" or not entry.get("ranking")):
        raise InputError(
            f"{ctx.dataset_info}: '{ctx.path.name}' is not sharegpt ranking data; for alpaca use the unidpo format"
        )
    return {**COLUMNS, **entry.get("columns", {})}, {**SHAREGPT_TAGS, "system_tag": "system", **entry.get("tags", {})}


def required(ctx: ImportContext) -> tuple[str, ...]:
    columns, _ = layout(ctx)
    return tuple(columns[k] for k in ("messages", "chosen", "rejected", "images"))


def pair_of(row: dict[str, Any], ctx: ImportContext) -> PairRecord:
    """One sharegpt ranking row as a pair."""
    columns, tags = layout(ctx)
    role, content = tags["role_tag"], tags["content_tag"]
    image = single_image(field_of(row, columns["images"]), ctx)
    messages = field_of(row, columns["messages"])
    if not isinstance(messages, list) or not all(isinstance(t, dict) for t in messages):
        raise RowProblem(f"'{columns['messages']}' must be a list of messages")
    turns = [t for t in messages if t.get(role) != tags["system_tag"]]
    if len(turns) != 1 or turns[0].get(role) != tags["user_tag"]:
        raise RowProblem(f"the conversation must be one {tags['user_tag']!r} turn")
    texts = []
    for key in ("chosen", "rejected"):
        answer = field_of(row, columns[key])
        if not isinstance(answer, dict) or answer.get(role) != tags["assistant_tag"]:
            raise RowProblem(f"'{columns[key]}' must be one {tags['assistant_tag']!r} message")
        texts.append(answer.get(content) or "")
    return pair_from_row(
        row,
        image=image,
        prompt=without_image_tags(turns[0].get(content) or "", 1),
        chosen=texts[0],
        rejected=texts[1],
        prefix="",
        source="llamafactory",
        rejected_image=rejected_image_of(row, ctx),
    )
