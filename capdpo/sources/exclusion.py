"""Exclusion lists (`images.exclude`): images a run must never use, e.g. every evaluation image.

A list names images by id, sha256, path, file name or COCO id (one per line, or JSON), or is AMBER's
`query_all.json`, another run's `01_images.jsonl` or a folder of images; listed image files are also matched by
content, so a renamed copy of an evaluation image is still caught.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.jsonl import iter_jsonl, read_json
from capdpo.sources.base import Candidate
from capdpo.sources.files import list_image_files

_HEX = re.compile(r"^[0-9a-f]+$")
_COCO_STEM = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?0*(\d+)$")


@dataclass
class Exclusion:
    """Images never to use, by content hash, image id, path, file name or source id (e.g. COCO id)."""

    hashes: set[str] = field(default_factory=set)  # sha256 given in a list
    copies: set[str] = field(default_factory=set)  # sha256 of existing image files a list names
    ids: set[str] = field(default_factory=set)  # capdpo image ids (20 hex digits)
    paths: set[str] = field(default_factory=set)  # paths of 2+ parts, without leading "/", "./", "../"
    names: set[str] = field(default_factory=set)  # file names and file names without extension
    numbers: set[str] = field(default_factory=set)  # numeric ids without leading zeros (COCO ids)
    tokens: set[str] = field(default_factory=set)  # every entry verbatim, compared with source_id
    entries: int = 0

    def add(self, token: str, base: Path, image_suffixes: set[str]) -> None:
        """Classify one entry of a list; an entry naming an existing image file also excludes its content."""
        token = token.strip()
        if not token:
            return
        self.entries += 1
        self.tokens.add(token)
        low = token.lower()
        if _HEX.match(low) and len(low) in (20, 64):
            (self.hashes if len(low) == 64 else self.ids).add(low)
            return
        if token.isdigit():
            self.numbers.add(token.lstrip("0") or "0")
            return
        for where in (base / token, Path(token)):
            if where.is_file() and where.suffix.lower() in image_suffixes:
                self.copies.add(hashlib.sha256(where.read_bytes()).hexdigest())
                self.paths.add(_path_key(os.path.abspath(where)))
                break
        key = _path_key(token)
        if "/" in key:
            self.paths.add(key)
        name = key.rsplit("/", 1)[-1]
        self.names.update({name, os.path.splitext(name)[0]})

    def match_candidate(self, cand: Candidate) -> str | None:
        """Why a candidate is excluded before its bytes are read (None: not excluded)."""
        if cand.source_id is not None:
            sid = cand.source_id
            if sid in self.tokens or (sid.isdigit() and (sid.lstrip("0") or "0") in self.numbers):
                return "source_id"
        if cand.path is not None:
            return self.match_name(cand.path.name, str(cand.path))
        return None

    def match_name(self, name: str, path: str = "") -> str | None:
        """Why a file name / path is excluded (None: not excluded)."""
        if path and self.paths:
            # A listed path matches any candidate path ending with it: "val2017/x.jpg" matches "/data/val2017/x.jpg".
            parts = _path_key(path).split("/")
            if any("/".join(parts[i:]) in self.paths for i in range(len(parts) - 1)):
                return "path"
        if name and (name in self.names or os.path.splitext(name)[0] in self.names):
            return "name"
        numeric = _COCO_STEM.match(os.path.splitext(name)[0]) if name else None
        if numeric and (numeric.group(1).lstrip("0") or "0") in self.numbers:
            return "coco_id"
        return None

    def match_content(self, sha256: str, name: str) -> str | None:
        """Why an image is excluded once its hash (and, for HF rows, its file name) is known."""
        if sha256 in self.copies:
            return "content"
        if sha256 in self.hashes:
            return "sha256"
        if sha256[:20] in self.ids:
            return "id"
        return self.match_name(name) if name else None


def _path_key(path: str) -> str:
    """A path as compared by exclusion lists: posix separators, no leading "/", "./" or "../" parts."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


def load_exclusion(files: list[str], extensions: list[str]) -> Exclusion:
    """Read the `images.exclude` files (see `add_exclusion_file`) into one `Exclusion`."""
    exclusion = Exclusion()
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    suffixes |= {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    for entry in files:
        add_exclusion_file(exclusion, Path(entry), suffixes)
    return exclusion


def add_exclusion_file(exclusion: Exclusion, path: Path, image_suffixes: set[str]) -> None:
    """Add one exclusion source.

    Accepted: a text file with one entry per line (`#` starts a comment line); a JSON list of strings / numbers or
    of objects (AMBER's `query_all.json`: each object's "image" is excluded); a COCO annotation json (its images'
    file names and ids); a JSONL file of objects (e.g. another run's `01_images.jsonl`); an image file, or a folder
    of images, excluded by content.
    """
    if path.is_dir():
        for _rel, image in list_image_files(path, sorted(image_suffixes)):
            exclusion.add(str(image), Path(), image_suffixes)
        return
    if not path.is_file():
        raise InputError(f"{path}: exclusion file not found (images.exclude)")
    if path.suffix.lower() in image_suffixes:
        exclusion.add(str(path), Path(), image_suffixes)
        return
    base = path.parent
    if path.suffix.lower() == ".jsonl":
        for record in iter_jsonl(path):
            _add_object(exclusion, record, base, image_suffixes)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark must not hide the first entry
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text or JSON exclusion list (images.exclude)") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = data["images"]  # a COCO annotation file
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of ids / names or of objects (images.exclude)")
        for number, item in enumerate(data):
            if isinstance(item, dict):
                _add_object(exclusion, item, base, image_suffixes)
            elif isinstance(item, (str, int)) and not isinstance(item, bool):
                exclusion.add(str(item), base, image_suffixes)
            else:
                raise InputError(f"{path}: item {number} is {type(item).__name__}, not a string, number or object")
        return
    for line in text.splitlines():
        if not line.strip().startswith("#"):
            exclusion.add(line, base, image_suffixes)


def _add_object(exclusion: Exclusion, item: dict[str, Any], base: Path, image_suffixes: set[str]) -> None:
    # "id" is only an image id when it looks like one: AMBER's "id" numbers queries, not images.
    for key in ("image", "image_path", "file_name", "path", "sha256", "image_id"):
        if isinstance(item.get(key), (str, int)) and not isinstance(item.get(key), bool):
            exclusion.add(str(item[key]), base, image_suffixes)
    if isinstance(item.get("id"), str) and _HEX.match(item["id"].lower()) and len(item["id"]) in (20, 64):
        exclusion.add(item["id"], base, image_suffixes)
