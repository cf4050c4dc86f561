"""Image sources of stage 1: what they offer (`Candidate`s) and how their bytes are read (`Loaded`).

Sources (`images.source`): `folder` and `coco` (`capdpo.sources.files`), `hf` (`capdpo.sources.hf`). A source
lists candidates without reading them; stage 1 reads only the ones it examines, in `sampling_order`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdpo.images import over_limits


@dataclass(slots=True)
class Candidate:
    """An image the source offers, before it is read."""

    key: str  # stable sort key: relative path or zero-padded row number
    path: Path | None = None  # file on disk (folder / coco)
    row: int | None = None  # row of an HF source
    source_id: str | None = None
    objects: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    def where(self) -> dict[str, Any]:
        """How errors.jsonl names this candidate."""
        if self.path is not None:
            return {"path": str(self.path)}
        return {"row": self.row, "source_id": self.source_id}


@dataclass(slots=True)
class Loaded:
    """A candidate's bytes (or why they could not be read) and the file name it came with."""

    data: bytes | None
    name: str
    problem: tuple[str, str] | None = None  # (kind, reason)


def read_file(path: Path) -> Loaded:
    """A file's bytes, or the reason it cannot be read (a file over the byte limit is not read at all)."""
    try:
        problem = over_limits(size=path.stat().st_size)
        if problem:
            return Loaded(None, path.name, ("too_large", f"file too large ({problem})"))
        return Loaded(path.read_bytes(), path.name)
    except OSError as err:
        return Loaded(None, path.name, ("unreadable", f"cannot read file ({err.strerror or err})"))


def sampling_order(candidates: list[Candidate], n: int, seed: int) -> list[Candidate]:
    """Candidates in the order they are examined: sorted by key, then shuffled with the seed when sampling."""
    ordered = sorted(candidates, key=lambda c: c.key)
    if n:
        random.Random(seed).shuffle(ordered)
    return ordered
