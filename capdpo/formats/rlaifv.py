"""RLAIF-V-Dataset / topic-overwrite (TPO) parquet: a file or a folder of `*.parquet` shards (import only).

Columns: `image` (a struct of `bytes` and `path`, raw bytes, or a path), `question`, `chosen`, `rejected`;
optional `ds_name`, `origin_dataset`, `origin_split`, `idx`, `image_path` (kept in the pair's `meta`) and `logps`
(RLAIF-V's reference log-probs, `{"logps": [chosen, chosen_mean, chosen_per_token, rejected, rejected_mean,
rejected_per_token]}`: the two sums and means are kept in `meta.reference_logps`). Embedded images are written
once to `<run_dir>/images/<sha256[:20]>.<ext>` (temp file, then rename); the image id is that hash prefix, as in
stage 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.formats.rows import (
    ImportContext,
    Parsed,
    RowProblem,
    image_file,
    is_number,
    new_pair,
    prompt_text,
    text_of,
)
from capdpo.images import materialize_image, row_group_over_limits

REQUIRED = ("image", "question", "chosen", "rejected")
META = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")


def parquet_files(path: Path) -> list[Path]:
    """The parquet file, or the sorted `*.parquet` shards of a folder."""
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise InputError(f"{path}: no *.parquet files in this folder")
        return files
    if not path.is_file():
        raise InputError(f"{path}: not found")
    return [path]


def reference_logps(value: Any) -> dict[str, Any] | None:
    """RLAIF-V's `logps` cell ({"logps": [c, c_mean, c_tokens, r, r_mean, r_tokens]}) as sums and means."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        value = value.get("logps")
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        return None
    chosen, chosen_mean, _, rejected, rejected_mean, _ = value
    if not all(is_number(v) for v in (chosen, chosen_mean, rejected, rejected_mean)):
        return None
    return {
        "chosen": float(chosen),
        "rejected": float(rejected),
        "chosen_mean": float(chosen_mean),
        "rejected_mean": float(rejected_mean),
        "from": "the dataset's logps column (its authors' reference model)",
    }


def read(ctx: ImportContext) -> Iterator[Parsed]:
    """RLAIF-V / topic-overwrite parquet rows as pairs."""
    import pyarrow.parquet as pq

    taken = 0
    for file in parquet_files(ctx.path):
        try:
            handle = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
            raise InputError(f"{file}: not a readable parquet file ({type(err).__name__}: {err})") from None
        columns = handle.schema_arrow.names
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise InputError(
                f"{file}: missing column '{missing[0]}' (columns: {', '.join(columns)}); is this RLAIF-V data?"
            )
        wanted = [c for c in (*REQUIRED, *META, "logps") if c in columns]
        row = 0
        for group in range(handle.num_row_groups):
            too_large = row_group_over_limits(handle, group, "image")
            if too_large:
                batches = [[None] * handle.metadata.row_group(group).num_rows]
            else:
                batches = (
                    b.to_pylist() for b in handle.iter_batches(batch_size=16, row_groups=[group], columns=wanted)
                )
            for batch in batches:
                for record in batch:
                    row += 1
                    try:
                        if too_large:
                            raise RowProblem(too_large)
                        yield Parsed(row, str(file), pair=_pair(record, row, str(file), ctx))
                    except RowProblem as problem:
                        yield Parsed(row, str(file), reason=str(problem))
                    taken += 1
                    if ctx.max_rows and taken >= ctx.max_rows:
                        return


def _image(value: Any, ctx: ImportContext) -> tuple[str, str]:
    """An image cell (struct of bytes/path, bytes, or a path) as (path, id)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, value
    if data:
        if ctx.images_dir is None:
            raise RowProblem("embedded image bytes, but no folder to write them to (images_dir)")
        try:
            found = materialize_image(bytes(data), ctx.images_dir)
        except ValueError as err:
            raise RowProblem(str(err)) from None
        ctx.counts["images_materialized"] += 1
        return found
    if isinstance(path, str) and path:
        return image_file(path, ctx)
    raise RowProblem("no image (neither bytes nor a path)")


def _pair(record: dict[str, Any], row: int, source: str, ctx: ImportContext) -> Any:
    texts = {k: text_of(record.get(k)) for k in ("question", "chosen", "rejected")}
    bad = [k for k, v in texts.items() if v is None]
    if bad:
        raise RowProblem(f"'{bad[0]}' is not a string")
    image, image_id = _image(record.get("image"), ctx)
    meta: dict[str, Any] = {"imported_from": "rlaifv", "source": source, "row": row}
    meta.update({k: record[k] for k in META if record.get(k) is not None})
    if record.get("logps") is not None:
        logps = reference_logps(record["logps"])
        if logps is None:
            ctx.counts["reference_logps_unreadable"] += 1
        else:
            meta["reference_logps"] = logps
            ctx.counts["with_reference_logps"] += 1
    return new_pair(image, image_id, prompt_text(texts["question"]), texts["chosen"], texts["rejected"], None, meta)
