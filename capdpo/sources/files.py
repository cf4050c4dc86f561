"""Folder and COCO sources: images that are files on disk (COCO: with their annotations, kept for CHAIR)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import read_json
from capdpo.sources.base import Candidate, Loaded, read_file
from capdpo.sources.config import ImagesConfig


def list_image_files(
    root: Path, extensions: list[str], skip_dirs: tuple[Path, ...] = (), unnamed: list[str] | None = None
) -> list[tuple[str, Path]]:
    """Image files under `root` (recursive, hidden entries skipped) as (relative posix path, path), sorted.

    A file whose name is not valid UTF-8 (it could not be named in a record) is left out; with `unnamed` given,
    its path is added there, its undecodable bytes written as `\\xNN` escapes.
    """
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    skip = {p.resolve() for p in skip_dirs}
    found = []
    visited: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in visited or real in skip:  # a symlink loop, or our own output folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in suffixes:
                continue
            path = Path(dirpath) / name
            try:
                str(path).encode("utf-8")
            except UnicodeEncodeError:
                if unnamed is not None:
                    unnamed.append(os.fsencode(path).decode("utf-8", "backslashreplace"))
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


class FileSource:
    """Images that are files on disk: a folder, or a COCO images folder with its annotations."""

    def __init__(self, kind: str, root: Path, files: list[tuple[str, Path]], annotations: dict[str, Any]) -> None:
        self.kind = kind
        self.root = root
        self.stats: dict[str, Any] = {}
        self.candidates: list[Candidate] = []
        self.unnamed: list[str] = []  # files whose names are not UTF-8 (not candidates: no record can name them)
        for rel, path in files:
            entry = annotations.get(rel) or annotations.get(path.name)
            cand = Candidate(key=rel, path=Path(os.path.abspath(path)))
            if entry is not None:
                cand.source_id, cand.objects, cand.captions = entry["id"], entry["objects"], entry["captions"]
            self.candidates.append(cand)

    def read(self, chunk: list[Candidate]) -> Iterator[Loaded]:
        for cand in chunk:
            assert cand.path is not None
            yield read_file(cand.path)


def _require_dir(path: str, what: str) -> Path:
    if not path:
        raise ConfigError(f"images.path: empty — set the {what}")
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root}: {what} not found (images.path)")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (images.path should be the {what})")
    return root


def folder_source(sec: ImagesConfig, run_dir: Path) -> FileSource:
    """All image files under `images.path`."""
    root = _require_dir(sec.path, "image folder")
    unnamed: list[str] = []
    files = list_image_files(root, sec.extensions, skip_dirs=(run_dir,), unnamed=unnamed)
    if not files:
        raise InputError(f"{root}: no image files ({', '.join(sec.extensions)}) in this folder or below (images.path)")
    source = FileSource("folder", root, files, {})
    source.unnamed = unnamed
    return source


def read_coco(instances: str, captions: str) -> dict[str, dict[str, Any]]:
    """COCO annotations by file name: {"id", "objects" (sorted unique category names), "captions"}.

    Raises:
        InputError: a file is missing, not JSON, or not shaped like a COCO annotation file (named in the message).
    """
    by_id: dict[int, dict[str, Any]] = {}

    def load(path_str: str, field_name: str, needs: tuple[str, ...]) -> dict[str, Any]:
        path = Path(path_str)
        if not path.is_file():
            raise InputError(f"{path}: COCO annotation file not found (images.{field_name})")
        data = read_json(path)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", *needs)):
            keys = ", ".join(f"'{k}'" for k in ("images", *needs))
            raise InputError(f"{path}: not a COCO annotation file (needs the lists {keys}) (images.{field_name})")
        for number, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
                raise InputError(f"{path}: images[{number}] has no 'id' and 'file_name'")
            entry = by_id.setdefault(image["id"], {"file_name": image["file_name"], "objects": set(), "captions": []})
            entry["file_name"] = image["file_name"]
        return data

    if instances:
        data = load(instances, "coco_instances", ("annotations", "categories"))
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
        except (KeyError, TypeError):
            raise InputError(f"{instances}: a category has no 'id' and 'name'") from None
        for number, ann in enumerate(data["annotations"]):
            try:
                image_id, category = ann["image_id"], ann["category_id"]
            except (KeyError, TypeError):
                raise InputError(f"{instances}: annotations[{number}] has no 'image_id' and 'category_id'") from None
            if category not in names:
                raise InputError(f"{instances}: annotations[{number}] names unknown category_id {category!r}")
            if image_id in by_id:
                by_id[image_id]["objects"].add(names[category])
    if captions:
        data = load(captions, "coco_captions", ("annotations",))
        try:
            ordered = sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0)))
            for ann in ordered:
                if ann["image_id"] in by_id:
                    by_id[ann["image_id"]]["captions"].append(str(ann["caption"]).strip())
        except (KeyError, TypeError):
            raise InputError(f"{captions}: an annotation has no 'image_id' and 'caption'") from None
    return {
        e["file_name"]: {"id": str(i), "objects": sorted(e["objects"]), "captions": e["captions"]}
        for i, e in by_id.items()
    }


def coco_source(sec: ImagesConfig, run_dir: Path) -> FileSource:
    """Image files of a COCO images folder, with ids, object categories and captions from the json files."""
    root = _require_dir(sec.path, "COCO images folder")
    annotations = read_coco(sec.coco_instances, sec.coco_captions)
    unnamed: list[str] = []
    files = list_image_files(root, sec.extensions, skip_dirs=(run_dir,), unnamed=unnamed)
    if not files:
        raise InputError(f"{root}: no image files ({', '.join(sec.extensions)}) in this folder or below (images.path)")
    source = FileSource("coco", root, files, annotations)
    source.unnamed = unnamed
    on_disk = {rel for rel, _ in files} | {p.name for _, p in files}
    annotated = sum(1 for c in source.candidates if c.source_id is not None)
    source.stats = {
        "coco_annotated_images": len(annotations),
        "coco_annotated_on_disk": annotated,
        "coco_unannotated_on_disk": len(source.candidates) - annotated,
        "coco_annotated_missing_on_disk": sum(1 for name in annotations if name not in on_disk),
    }
    return source
