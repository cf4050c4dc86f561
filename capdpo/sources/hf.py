"""HF sources: a dataset saved with `save_to_disk`, or parquet files, with an image column."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError, one_line
from capdpo.images import SUFFIXES, row_group_over_limits
from capdpo.paths import resolve_inside
from capdpo.sources.base import Candidate, Loaded, read_file
from capdpo.sources.config import ImagesConfig

# Candidates read from an HF source at once: rows are fetched sorted by storage position within a chunk.
HF_READ_CHUNK = 64


class HFSource:
    """Rows of a `save_to_disk` dataset or of parquet files; each image is written to `<run_dir>/images/`."""

    kind = "hf"

    def __init__(self, sec: ImagesConfig, run_dir: Path) -> None:
        if not sec.path:
            raise ConfigError("images.path: empty — set the HF dataset folder (save_to_disk) or parquet file/folder")
        self.root = Path(sec.path)
        if not self.root.exists():
            raise InputError(f"{self.root}: HF dataset / parquet path not found (images.path)")
        self.image_column = sec.hf_image_column
        self.id_column = sec.hf_id_column
        self.images_dir = run_dir / "images"
        self.stats: dict[str, Any] = {}
        self._dataset: Any = None
        # Row groups of all parquet files in row order: (first global row, file, ParquetFile, group index).
        self._groups: list[tuple[int, Path, Any, int]] = []
        self._cached_group: tuple[int, Any] | None = None  # the last row group read: (number, table)
        saved = [self.root / name for name in ("dataset_info.json", "state.json", "dataset_dict.json")]
        if self.root.is_dir() and any(p.exists() for p in saved):
            ids = self._open_saved()
        else:
            ids = self._open_parquet()
        width = len(str(max(len(ids) - 1, 0)))
        self.candidates = [
            Candidate(key=str(row).zfill(width), row=row, source_id=None if ids[row] is None else str(ids[row]))
            for row in range(len(ids))
        ]
        if not self.candidates:
            raise InputError(f"{self.root}: the dataset has no rows (images.path)")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.images_dir.glob("*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def _check_columns(self, where: Path, columns: list[str]) -> None:
        for name, field_name in ((self.image_column, "hf_image_column"), (self.id_column, "hf_id_column")):
            if name and name not in columns:
                raise InputError(f"{where}: no column '{name}' (images.{field_name}); columns: {', '.join(columns)}")

    def _open_saved(self) -> list[Any]:
        import datasets

        try:
            dataset = datasets.load_from_disk(str(self.root))
        except Exception as err:  # noqa: BLE001 - datasets raises several types for a damaged folder
            raise InputError(f"{self.root}: cannot load the saved dataset ({one_line(err)})") from None
        if isinstance(dataset, datasets.DatasetDict):
            splits = list(dataset)
            if len(splits) != 1:
                raise InputError(
                    f"{self.root}: holds the splits {', '.join(splits)}; point images.path at one of them "
                    f"(e.g. {self.root / splits[0]})"
                )
            dataset = dataset[splits[0]]
        self._check_columns(self.root, dataset.column_names)
        columns = [c for c in (self.image_column, self.id_column) if c]
        dataset = dataset.select_columns(columns)
        if isinstance(dataset.features[self.image_column], datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self._dataset = dataset
        return list(dataset[self.id_column]) if self.id_column else [None] * len(dataset)

    def _open_parquet(self) -> list[Any]:
        import pyarrow.parquet as pq

        if self.root.is_file():
            files = [self.root]
        else:
            files = sorted(p for p in self.root.rglob("*.parquet") if not p.name.startswith("."))
            if not files:
                raise InputError(f"{self.root}: neither a saved HF dataset nor parquet files (images.path)")
        ids: list[Any] = []
        for path in files:
            try:
                handle = pq.ParquetFile(path)
            except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for damaged files
                raise InputError(f"{path}: not a readable parquet file ({one_line(err)})") from None
            self._check_columns(path, handle.schema_arrow.names)
            start = len(ids)
            for index in range(handle.metadata.num_row_groups):
                self._groups.append((start, path, handle, index))
                start += handle.metadata.row_group(index).num_rows
            if self.id_column:
                ids.extend(handle.read(columns=[self.id_column]).column(0).to_pylist())
            else:
                ids.extend([None] * handle.metadata.num_rows)
        return ids

    def read(self, chunk: list[Candidate]) -> Iterator[Loaded]:
        """Bytes of the chunk's rows, in the chunk's order (fetched in storage order)."""
        rows = sorted({c.row for c in chunk if c.row is not None})
        cells = self._cells(rows)
        for cand in chunk:
            value = cells[cand.row]
            yield value if isinstance(value, Loaded) else self._cell_bytes(value)

    def _cells(self, rows: list[int]) -> dict[int, Any]:
        if self._dataset is not None:
            return {row: self._dataset[row][self.image_column] for row in rows}
        starts = [g[0] for g in self._groups]
        by_group: dict[int, list[int]] = {}
        for row in rows:
            by_group.setdefault(bisect.bisect_right(starts, row) - 1, []).append(row)
        cells: dict[int, Any] = {}
        for number, wanted in sorted(by_group.items()):
            start, path, handle, group_index = self._groups[number]
            if self._cached_group is None or self._cached_group[0] != number:
                too_large = row_group_over_limits(handle, group_index, self.image_column)
                if too_large:
                    cells.update({r: Loaded(None, "", ("too_large", f"{path}: {too_large}")) for r in wanted})
                    continue
                try:
                    table = handle.read_row_group(group_index, columns=[self.image_column])
                except Exception as err:  # noqa: BLE001 - a damaged row group costs its rows, not the run
                    reason = f"unreadable parquet row group {group_index} of {path} ({one_line(err)})"
                    cells.update({r: Loaded(None, "", ("unreadable", reason)) for r in wanted})
                    continue
                self._cached_group = (number, table)
            values = self._cached_group[1].column(0).take([r - start for r in wanted]).to_pylist()
            cells.update(zip(wanted, values, strict=True))
        return cells

    def _cell_bytes(self, value: Any) -> Loaded:
        """Bytes from an HF Image cell ({"bytes", "path"}), raw bytes, or a path string."""
        name, path = "", None
        if isinstance(value, dict):
            path = value.get("path") or None
            name = os.path.basename(path) if path else ""
            if value.get("bytes"):
                return Loaded(bytes(value["bytes"]), name)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            return Loaded(bytes(value), "")
        elif isinstance(value, str):
            path, name = value, os.path.basename(value)
        elif value is not None:
            return Loaded(None, "", ("not_image", f"image cell holds {type(value).__name__}, not image bytes"))
        if not path:
            return Loaded(None, name, ("empty", "empty image cell"))
        base = self.root if self.root.is_dir() else self.root.parent
        candidate = resolve_inside(path, base)  # never outside the dataset's folder, whatever the cell says
        if candidate is None:
            return Loaded(None, name, ("outside", f"image cell path '{path}' leads outside the dataset folder {base}"))
        if candidate.is_file():
            return read_file(candidate)
        return Loaded(None, name, ("unreadable", f"image cell points to a missing file '{path}'"))

    def image_path(self, image_id: str, fmt: str) -> Path:
        """Where a row's image is written: `<run_dir>/images/<id>.<ext>` (absolute)."""
        return Path(os.path.abspath(self.images_dir / f"{image_id}.{SUFFIXES.get(fmt, fmt.lower())}"))

    def materialize(self, data: bytes, target: Path) -> None:
        """Write the image bytes unchanged to `target`, atomically (temp file, then rename)."""
        if not (target.is_file() and target.stat().st_size == len(data)):
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            # No fsync per image (it dominated the run time): a file cut short by a power loss has the wrong size,
            # and every rerun re-reads HF rows and rewrites such a file before it is used.
            tmp.write_bytes(data)
            os.replace(tmp, target)
