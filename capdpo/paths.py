"""Confining the paths an input names: an image path in a dataset row stays inside the folder it belongs to.

Inputs come from other people (datasets, exports, parquet files): a row naming `../../../etc/passwd` or
`/home/someone/.ssh/id_rsa` as its image must be refused, not read. `inside` resolves symlinks and `..` before
comparing, so neither can lead out. Names capdpo turns into output files (a dataset name) must be plain names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def resolve_inside(
    path: str | os.PathLike[str], base: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]] = ()
) -> Path | None:
    """`path` (relative to `base`, or absolute) resolved, if it lies inside `base` or one of `roots`; else None."""
    resolved = Path(os.path.realpath(os.path.join(base, path)))
    for root in (base, *roots):
        top = Path(os.path.realpath(root))
        if resolved == top or top in resolved.parents:
            return resolved
    return None


def is_plain_name(name: str) -> bool:
    """A name safe to become part of a file name: letters, digits, `.`, `_` and `-`, not starting with a dot."""
    return bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name
