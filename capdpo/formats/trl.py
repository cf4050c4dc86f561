"""TRL's conversational preference format for vision data (`trl_{split}.jsonl`).

A row holds `images` ([path]), `prompt` ([user message: an image part + the prompt text]), `chosen` / `rejected`
([assistant message]), plus capdpo's own columns (`capdpo.formats.rows`), and `rejected_images` ([path], ms-swift's column) for a pair
with a rejected image (the `mdpo` loss type's). It loads with
`datasets.load_dataset("json", ...)` and goes straight into `trl.DPOTrainer` (its vision collator opens the image
paths itself). On import, a prompt is one user message (optionally after a system message, which is dropped) and
may end with an assistant message: that message becomes the pair's `assistant_prefix`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capdpo.formats.rows import (
    ImportContext,
    RowProblem,
    by_split,
    completions,
    field_of,
    image_path,
    message_text,
    pair_from_row,
    provenance_columns,
    rejected_image_columns,
    rejected_image_of,
    single_image,
)
from capdpo.jsonl import write_jsonl
from capdpo.records import PairRecord

# columns a file cannot do without (the image column may be `images` or `image`)
REQUIRED = ("prompt", "chosen", "rejected")


def row_of(pair: PairRecord, image_root: str | None = None) -> dict[str, Any]:
    """One pair in TRL's conversational vision preference format."""
    chosen, rejected = completions(pair)
    return {
        "images": [image_path(pair.image, image_root)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair.prompt}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        **rejected_image_columns(pair, image_root),
        **provenance_columns(pair),
    }


def export(
    pairs: list[PairRecord], out_dir: Path, dataset_name: str, image_root: str | None = None
) -> tuple[list[Path], dict[str, Any]]:
    """Write `trl_{split}.jsonl` per split; return the files (TRL needs no dataset_info entry)."""
    files = []
    for split, group in by_split(pairs).items():
        path = out_dir / f"trl_{split}.jsonl"
        write_jsonl(path, (row_of(p, image_root) for p in group))
        files.append(path)
    return files, {}


def _completion_text(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1:
        role, text = message_text(value[0], key)
        if role == "assistant":
            return text
    raise RowProblem(f"'{key}' must be one assistant message (or a string)")


def pair_of(row: dict[str, Any], ctx: ImportContext) -> PairRecord:
    """One TRL row (`images`/`image`, `prompt`, `chosen`, `rejected`) as a pair."""
    image = single_image(row.get("images", row.get("image")), ctx)
    prompt_value = field_of(row, "prompt")
    prefix = ""
    if isinstance(prompt_value, str):
        prompt = prompt_value
    else:
        messages = [message_text(m, "prompt") for m in prompt_value]
        messages = [m for m in messages if m[0] != "system"]
        if messages and messages[-1][0] == "assistant":
            prefix = messages.pop()[1]
        if len(messages) != 1 or messages[0][0] != "user":
            raise RowProblem("'prompt' must be one user message (multi-turn prompts are not supported)")
        prompt = messages[0][1]
    return pair_from_row(
        row,
        image=image,
        prompt=prompt,
        chosen=_completion_text(field_of(row, "chosen"), "chosen"),
        rejected=_completion_text(field_of(row, "rejected"), "rejected"),
        prefix=prefix,
        source="trl",
        rejected_image=rejected_image_of(row, ctx),
    )
