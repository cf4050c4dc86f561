"""What every format shares: capdpo's own columns on exported rows, reading rows back as pairs, row problems.

**Round trips.** Every exported row also carries capdpo's own fields (`id`, `image_id`, `mode`, `split`,
`assistant_prefix`, `score_chosen`, `score_rejected`, and `meta_json`: the pair's `meta` as a JSON string, so the
column has one type for Arrow). Trainers ignore them; the importers use them to restore the pairs exactly
(`import(export(x)) == x`). Rows without them (other people's data) are imported too: the image id becomes the
image file's content hash, as in stage 1, and the pair id is derived from the content.

**Sentence mode.** A sentence-mode pair continues the description so far (`assistant_prefix`). None of the export
formats can express "continue this assistant message": TRL 1.16 renders a prompt that ends with an assistant
message with `continue_final_message`, but renders prompt + chosen as two separate assistant turns, so the
completion it trains on would start with an end-of-turn and a new assistant header; LLaMA-Factory requires the
conversation to end with a user turn. The exports therefore fold the prefix into both completions
(`prefix + " " + sentence`): the model sees the same image, prompt and earlier sentences as when it wrote them,
and with DPO's summed log-probabilities the shared prefix tokens cancel exactly between chosen and rejected
(length-normalised losses such as IPO or Uni-DPO's per-token mean are diluted by them). `05_pairs.jsonl` keeps
the prefix separate for trainers that condition on it directly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.images import image_content_id
from capdpo.jsonl import iter_jsonl, read_json
from capdpo.paths import resolve_inside
from capdpo.records import PairRecord, pair_id

IMAGE_TAG = "<image>"  # LLaMA-Factory's image placeholder; one per image in the user turn
DATASET_INFO = "dataset_info.json"
# Columns every export row carries so the importers can restore the pair exactly.
PROVENANCE = ("id", "image_id", "mode", "split", "assistant_prefix", "score_chosen", "score_rejected", "meta_json")


class RowProblem(Exception):
    """Why one input row cannot become a pair (the import command skips it; a strict import fails on it)."""


@dataclass
class Parsed:
    """One input row: its pair, or why it has none."""

    row: int
    source: str
    pair: PairRecord | None = None
    reason: str = ""
    own_split: bool = False  # the row carried capdpo's own split column


@dataclass
class ImportContext:
    """What every format reader gets."""

    path: Path
    image_root: str  # relative image paths are resolved against this folder; no image path leads out of it
    allowed_roots: tuple[str, ...] = ()  # other folders image paths may point into
    images_dir: Path | None = None  # where embedded image bytes are written (None: such rows are skipped)
    dataset_info: str | None = None
    max_rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    row: int = 0  # the number of the row being parsed (1-based)


# ---- exporting ----------------------------------------------------------------------------------------------
def completions(pair: PairRecord) -> tuple[str, str]:
    """Chosen and rejected as the exported completions (sentence mode: the prefix folded in, see module doc)."""
    if not pair.assistant_prefix:
        return pair.chosen, pair.rejected
    return f"{pair.assistant_prefix} {pair.chosen}", f"{pair.assistant_prefix} {pair.rejected}"


def image_path(image: str, image_root: str | None) -> str:
    """An exported image path: absolute, or relative to `image_root` (LLaMA-Factory's `media_dir`)."""
    absolute = os.path.abspath(image)
    return os.path.relpath(absolute, image_root) if image_root else absolute


def provenance_columns(pair: PairRecord) -> dict[str, Any]:
    """capdpo's own columns of an exported row (see the module docstring)."""
    return {
        "id": pair.id,
        "image_id": pair.image_id,
        "mode": pair.mode,
        "split": pair.split,
        "assistant_prefix": pair.assistant_prefix,
        "score_chosen": pair.score_chosen,
        "score_rejected": pair.score_rejected,
        "meta_json": json.dumps(pair.meta, ensure_ascii=False, sort_keys=True),
    }


def by_split(pairs: Iterable[PairRecord]) -> dict[str, list[PairRecord]]:
    """The pairs grouped by split, splits in name order (each export file holds one split)."""
    groups: dict[str, list[PairRecord]] = {}
    for pair in pairs:
        groups.setdefault(pair.split, []).append(pair)
    return dict(sorted(groups.items()))


# ---- reading rows -----------------------------------------------------------------------------------------------
def json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a `.jsonl` file or a `.json` list of objects."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise InputError(f"{path}: expected a JSON list of objects (one per pair)")
    return data


def require_columns(rows: list[dict[str, Any]], names: tuple[str, ...], path: Path, fmt: str) -> None:
    """A column that no row has is an error for the whole file (it is the wrong format, not a bad row)."""
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    for name in names:
        if name not in present:
            seen = ", ".join(sorted(present)[:12]) or "none"
            raise InputError(f"{path}: no row has column '{name}' (columns seen: {seen}); is this {fmt} data?")


def parse_rows(
    rows: list[dict[str, Any]], ctx: ImportContext, parse: Callable[[dict[str, Any], ImportContext], PairRecord]
) -> Iterator[Parsed]:
    """Each row through `parse` (which raises `RowProblem` for an unusable row)."""
    source = str(ctx.path)
    for number, row in enumerate(rows, start=1):
        if ctx.max_rows and number > ctx.max_rows:
            return
        ctx.row = number
        try:
            pair = parse(row, ctx)
        except RowProblem as problem:
            yield Parsed(number, source, reason=str(problem))
            continue
        own_split = all(k in row for k in PROVENANCE) and row.get("split") in ("train", "val")
        yield Parsed(number, source, pair=pair, own_split=own_split)


def field_of(row: dict[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise RowProblem(f"missing '{key}'")
    return row[key]


def text_of(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def single_image(value: Any, ctx: ImportContext) -> str:
    """The one image path of a row's image cell (a path, a list of one path, or a `datasets` Image dict), resolved
    inside the input's image folder (`capdpo.paths`)."""
    images = value if isinstance(value, list) else [value]
    if len(images) != 1:
        raise RowProblem(f"{len(images)} images; a capdpo pair has exactly one")
    image = images[0]
    if isinstance(image, dict):  # a `datasets` Image feature written out: {"bytes": ..., "path": ...}
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise RowProblem("the image has no file path (embedded image bytes are not supported)")
    return confined(image, ctx)


def rejected_image_columns(pair: PairRecord, image_root: str | None) -> dict[str, Any]:
    """`rejected_images` ([path], ms-swift's column) for a pair with a rejected image (mdpo); nothing otherwise."""
    return {"rejected_images": [image_path(pair.rejected_image, image_root)]} if pair.rejected_image else {}


def rejected_image_of(row: dict[str, Any], ctx: ImportContext) -> str:
    """A row's rejected image (`rejected_images`, ms-swift's column, or `rejected_image`), or "" without one."""
    value = row.get("rejected_images", row.get("rejected_image"))
    return single_image(value, ctx) if value else ""


def confined(path_value: str, ctx: ImportContext) -> str:
    """An image path a row names, resolved inside `ctx.image_root` (or an allowed root), as an absolute path."""
    found = resolve_inside(path_value, ctx.image_root, ctx.allowed_roots)
    if found is None:
        raise RowProblem(
            f"image path '{path_value}' leads outside {ctx.image_root} (name more folders with --allowed_roots)"
        )
    return str(found)


def without_image_tags(text: str, n_images: int) -> str:
    """A prompt without its `<image>` placeholders (capdpo puts the image before the text itself)."""
    if text.startswith(IMAGE_TAG):  # how capdpo writes it: exactly one tag, no separator
        text = text[len(IMAGE_TAG) :]
    else:
        if text.count(IMAGE_TAG) != n_images:
            raise RowProblem(f"{text.count(IMAGE_TAG)} {IMAGE_TAG} tags for {n_images} image(s)")
        text = re.sub(r"\s*" + re.escape(IMAGE_TAG) + r"\s*", " ", text).strip()
    if IMAGE_TAG in text:
        raise RowProblem(f"more than one {IMAGE_TAG} tag; a capdpo pair has exactly one image")
    return text


def _strip_prefix(completion: str, prefix: str, key: str) -> str:
    if not prefix:
        return completion
    if not completion.startswith(prefix + " "):
        raise RowProblem(f"'{key}' does not start with the row's assistant_prefix")
    return completion[len(prefix) + 1 :]


def pair_from_row(
    row: dict[str, Any],
    *,
    image: str,
    prompt: str,
    chosen: str,
    rejected: str,
    prefix: str,
    source: str,
    rejected_image: str = "",
) -> PairRecord:
    """A pair from the parts a format holds, restoring capdpo's own columns when the row has them."""
    if all(key in row for key in PROVENANCE):  # written by capdpo: restore exactly
        prefix = row["assistant_prefix"] or ""
        try:
            meta = json.loads(row["meta_json"])
        except (TypeError, json.JSONDecodeError):
            raise RowProblem("'meta_json' is not a JSON string") from None
        return PairRecord(
            id=row["id"],
            image_id=row["image_id"],
            image=image,
            prompt=prompt,
            chosen=_strip_prefix(chosen, prefix, "chosen"),
            rejected=_strip_prefix(rejected, prefix, "rejected"),
            score_chosen=float(row["score_chosen"]),
            score_rejected=float(row["score_rejected"]),
            mode=row["mode"],
            split=row["split"],
            assistant_prefix=prefix,
            meta=meta,
            rejected_image=rejected_image,
        )
    has_scores = is_number(row.get("score_chosen")) and is_number(row.get("score_rejected"))
    scores = (float(row["score_chosen"]), float(row["score_rejected"])) if has_scores else None
    pair = new_pair(
        image, image_content_id(image), prompt, chosen, rejected, scores, {"imported_from": source}, prefix
    )
    pair.rejected_image = rejected_image
    return pair


def new_pair(
    image: str,
    image_id: str,
    prompt: str,
    chosen: str,
    rejected: str,
    scores: tuple[float, float] | None,
    meta: dict[str, Any],
    prefix: str = "",
) -> PairRecord:
    """A pair of other people's data: whole answers to the prompt (or sentences after `prefix`), scores 1 / 0
    when the data has none."""
    mode = "sentence" if prefix else "context"
    return PairRecord(
        id=pair_id(image_id, mode, prompt, prefix, chosen, rejected),
        image_id=image_id,
        image=image,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        score_chosen=scores[0] if scores else 1.0,
        score_rejected=scores[1] if scores else 0.0,
        mode=mode,
        assistant_prefix=prefix,
        meta={**meta, "scores_given": scores is not None},
    )


def message_text(message: Any, where: str) -> tuple[str, str]:
    """(role, text) of a chat message whose content is a string or a list of typed parts."""
    if not isinstance(message, dict) or "role" not in message:
        raise RowProblem(f"{where}: expected a chat message with 'role' and 'content'")
    content = message.get("content")
    if isinstance(content, str):
        return message["role"], content
    if isinstance(content, list):
        texts = [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return message["role"], "\n".join(texts)
    raise RowProblem(f"{where}: message content must be a string or a list of parts")


def dataset_info_entry(path: Path, dataset_info: str | Path | None) -> dict[str, Any]:
    """The `dataset_info.json` entry whose `file_name` is `path`'s name ({} without a dataset_info file)."""
    if dataset_info is None:
        return {}
    info = read_json(dataset_info)
    for entry in info.values() if isinstance(info, dict) else []:
        if isinstance(entry, dict) and entry.get("file_name") == path.name:
            return entry
    raise InputError(f"{dataset_info}: no entry has file_name '{path.name}'")


def prompt_text(value: str) -> str:
    """A prompt without `<image>` placeholders: capdpo's chat rendering puts the image before the text itself."""
    return " ".join(value.replace(IMAGE_TAG, " ").split()) if IMAGE_TAG in value else value.strip()


def image_file(path_value: str, ctx: ImportContext) -> tuple[str, str]:
    """(absolute path, content id) of an image file a row names, inside the input's image folder."""
    path = confined(path_value, ctx)
    if not os.path.isfile(path):
        raise RowProblem(f"image not found: {path}")
    return path, image_content_id(path)
