"""Every preference-data format capdpo reads or writes, registered in `FORMATS`.

| format | export (stage 5, `pairs.exports`) | import (`python -m capdpo import --format`) |
|---|---|---|
| `trl` | `trl_{split}.jsonl`: TRL's conversational vision preference rows | yes |
| `llamafactory` | `{dataset_name}_{split}.json` + `dataset_info.json`: sharegpt ranking data | yes |
| `unidpo` | `unidpo_{split}.json` + `dataset_info.json`: alpaca with scores | yes |
| `rlaifv` | - | RLAIF-V / TPO parquet |
| `mmrlhf` | - | MM-RLHF `dpo_pairs.jsonl` |

To add a format: a module in this package with `export(pairs, out_dir, dataset_name, image_root)` and/or
`pair_of(row, ctx)` (one row as a `PairRecord`, raising `RowProblem` for an unusable row) or `read(ctx)` (rows of
a file that is not JSON), registered below; a round-trip test in tests/formats/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.formats import llamafactory, mmrlhf, rlaifv, trl, unidpo
from capdpo.formats.rows import DATASET_INFO, ImportContext, Parsed, json_rows, parse_rows, require_columns
from capdpo.jsonl import write_json
from capdpo.records import PairRecord


@dataclass(frozen=True)
class Format:
    """A registered format: what it is and the functions capdpo has for it."""

    summary: str
    export: Callable[..., tuple[list[Path], dict[str, Any]]] | None = None
    pair_of: Callable[[dict[str, Any], ImportContext], PairRecord] | None = None  # JSON / JSONL rows
    read: Callable[[ImportContext], Iterator[Parsed]] | None = None  # other files (parquet)
    required: Callable[[ImportContext], tuple[str, ...]] | tuple[str, ...] = ()

    def rows(self, ctx: ImportContext, name: str) -> Iterator[Parsed]:
        """The input's rows as pairs (or why not); a column no row has is an `InputError` for the file."""
        if self.read is not None:
            yield from self.read(ctx)
            return
        if self.pair_of is None:
            raise InputError(f"--format: capdpo cannot import '{name}' data")
        rows = json_rows(ctx.path)
        if ctx.max_rows:
            rows = rows[: ctx.max_rows]
        required = self.required(ctx) if callable(self.required) else self.required
        require_columns(rows, required, ctx.path, name)
        yield from parse_rows(rows, ctx, self.pair_of)


FORMATS: dict[str, Format] = {
    "trl": Format("TRL conversational preference rows", trl.export, trl.pair_of, required=trl.REQUIRED),
    "llamafactory": Format(
        "LLaMA-Factory sharegpt ranking data",
        llamafactory.export,
        llamafactory.pair_of,
        required=llamafactory.required,
    ),
    "unidpo": Format("Uni-DPO alpaca rows with scores", unidpo.export, unidpo.pair_of, required=unidpo.REQUIRED),
    "rlaifv": Format("RLAIF-V / TPO parquet", read=rlaifv.read),
    "mmrlhf": Format("MM-RLHF dpo_pairs.jsonl", pair_of=mmrlhf.pair_of, required=mmrlhf.REQUIRED),
}
EXPORTERS = tuple(name for name, f in FORMATS.items() if f.export is not None)
IMPORTERS = tuple(name for name, f in FORMATS.items() if f.pair_of is not None or f.read is not None)


def write_exports(
    pairs: list[PairRecord],
    out_dir: str | Path,
    formats: Iterable[str] = EXPORTERS,
    dataset_name: str = "capdpo",
    image_root: str | None = None,
) -> dict[str, list[str]]:
    """Write the chosen formats into `out_dir` (plus `dataset_info.json` for the LLaMA-Factory-read ones).

    Args:
        pairs: the pairs; each file holds one split.
        out_dir: the folder (created if missing).
        formats: names from `EXPORTERS`.
        dataset_name: LLaMA-Factory dataset name (file names and `dataset_info.json` keys).
        image_root: write image paths relative to this folder (LLaMA-Factory's `media_dir`); default absolute.

    Returns:
        The file names written, by format.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    dataset_info: dict[str, Any] = {}
    for name in formats:
        if name not in EXPORTERS:
            raise ValueError(f"unknown export format {name!r}; choose from {', '.join(EXPORTERS)}")
        files, info = FORMATS[name].export(pairs, out_dir, dataset_name, image_root)
        dataset_info.update(info)
        written[name] = [f.name for f in files]
    if dataset_info:
        write_json(out_dir / DATASET_INFO, dataset_info)
        written.setdefault("dataset_info", []).append(DATASET_INFO)
    return written


def import_file(
    name: str,
    path: str | Path,
    *,
    split: str | None = None,
    image_root: str | None = None,
    images_dir: str | Path | None = None,
    dataset_info: str | Path | None = None,
    allowed_roots: Sequence[str | Path] = (),
) -> list[PairRecord]:
    """Every row of a file as pairs; the first unusable row is an `InputError` naming file and row (the import
    command skips such rows instead).

    Args:
        name: a format from `IMPORTERS`.
        path: the file (a parquet folder for `rlaifv`).
        split: put every pair in this split (default: the row's own `split` column, else "train").
        image_root: resolve relative image paths against this folder (default: the file's folder); a path that
            leads outside it (`..`, an absolute path, a symlink) is refused unless it lies in `allowed_roots`.
        images_dir: where embedded image bytes are written (`rlaifv`).
        dataset_info: `llamafactory`: a `dataset_info.json` naming the file's columns and tags.
    """
    path = Path(path)
    root = image_root or str((path if path.is_dir() else path.parent).resolve())
    ctx = ImportContext(
        path=path,
        image_root=root,
        images_dir=Path(images_dir) if images_dir else None,
        dataset_info=str(dataset_info) if dataset_info else None,
        allowed_roots=tuple(str(r) for r in allowed_roots),
    )
    pairs = []
    for parsed in FORMATS[name].rows(ctx, name):
        if parsed.pair is None:
            raise InputError(f"{parsed.source} row {parsed.row}: {parsed.reason}")
        if split:
            parsed.pair.split = split
        pairs.append(parsed.pair)
    return pairs
