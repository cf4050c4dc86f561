"""Stage 1: collect, sample, dedupe and check the run's images.

    python 1_prepare_images.py --config configs/demo.yaml [--n 500 --seed 1 ...]

Sources (`images.source`): `folder` (recursive), `coco` (images folder + optional instances/captions json) or
`hf` (a dataset saved with `save_to_disk`, or parquet files with an image column). Writes `01_images.jsonl`: one
record per usable image, id = the first 20 hex digits of the sha256 of its bytes. Files that cannot be used
(empty, not an image, corrupt, truncated, too small) are listed with the reason in `01_images.errors.jsonl`;
images named in the `exclude` files (evaluation sets) are never taken.

Sampling: candidates are sorted by a stable key (relative path, row number), shuffled with the seed, and taken in
that order until `n` images pass the checks; an unusable one is replaced by the next candidate. Only candidates
actually examined are read, so `n: 5000` from a 118k-image folder reads about 5000 files. Raising `n` extends
the same sample (the first 100 images of `n: 1000` are the images of `n: 100`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.images import ImageProblem, inspect_image
from capdpo.jsonl import JsonlAppender, iter_jsonl, write_jsonl
from capdpo.records import ImageRecord
from capdpo.run import Stage, progress
from capdpo.sections import load_config
from capdpo.sources.base import Candidate, Loaded, sampling_order
from capdpo.sources.config import ImagesConfig
from capdpo.sources.exclusion import Exclusion, load_exclusion
from capdpo.sources.files import FileSource, coco_source, folder_source
from capdpo.sources.hf import HF_READ_CHUNK, HFSource

# Records appended (and fsynced) per write; a crash loses at most this many checks, which are redone.
WRITE_BATCH = 8


def open_source(sec: ImagesConfig, run_dir: Path) -> FileSource | HFSource:
    """The configured image source, checked and listed (nothing is read yet)."""
    if sec.source != "coco" and (sec.coco_instances or sec.coco_captions):
        raise ConfigError(f"images.coco_instances/coco_captions are set but images.source is '{sec.source}'")
    if sec.source == "folder":
        return folder_source(sec, run_dir)
    if sec.source == "coco":
        return coco_source(sec, run_dir)
    return HFSource(sec, run_dir)


class ImageSelection:
    """Decides, candidate by candidate in sampling order, which images the run keeps.

    Left out, in this order: unreadable bytes, excluded content, duplicates of an image already kept, files that
    do not decode, images below `min_side`. Every kept record must equal the record at the same position of an
    earlier run's output (a resumed run redoes the same decisions), otherwise the output is stale.
    """

    def __init__(self, stage: Stage, source: FileSource | HFSource, exclusion: Exclusion, min_side: int) -> None:
        self.stage = stage
        self.source = source
        self.exclusion = exclusion
        self.min_side = min_side
        # Read, not yet opened: a refused (stale) output must keep its .done marker and meta untouched.
        self.previous = list(iter_jsonl(stage.output, allow_torn_tail=True)) if stage.output.exists() else []
        # Files an earlier run already checked: their hash, size and path are taken from its records.
        self.checked = {r["path"]: r for r in self.previous if isinstance(source, FileSource) and "path" in r}
        self.kept: list[dict[str, Any]] = []
        self.excluded: Counter[str] = Counter()
        self.examined = 0
        self.duplicates = 0
        self.duplicate_examples: list[dict[str, str]] = []
        self._first_copy: dict[str, str] = {}  # sha256 -> where the kept copy came from

    def needs_reading(self, cand: Candidate) -> bool:
        return not (cand.path is not None and str(cand.path) in self.checked)

    def examine(self, cand: Candidate, item: Loaded | None) -> dict[str, Any] | None:
        """The record for a candidate (`item` is None when an earlier run checked it), or None when left out."""
        self.examined += 1
        checked = self.checked.get(str(cand.path)) if item is None else None
        if item is not None and (item.problem or item.data is None):
            kind, reason = item.problem or ("unreadable", "no bytes")
            self.stage.skip(reason, kind=kind, **cand.where())
            return None
        if checked is not None:
            sha, name = checked["sha256"], Path(checked["path"]).name
        else:
            assert item is not None and item.data is not None
            sha, name = hashlib.sha256(item.data).hexdigest(), item.name
        excluded_by = self.exclusion.match_content(sha, name)
        if excluded_by:
            self.excluded[excluded_by] += 1
            return None
        where = str(cand.path) if cand.path is not None else f"row {cand.row}"
        if sha in self._first_copy:
            self.duplicates += 1
            if len(self.duplicate_examples) < 20:
                self.duplicate_examples.append({"duplicate": where, "kept": self._first_copy[sha]})
            return None
        if checked is not None:
            width, height, path = checked["width"], checked["height"], checked["path"]
        else:
            try:
                width, height, fmt = inspect_image(item.data)
            except ImageProblem as problem:
                self.stage.skip(problem.reason, kind=problem.kind, **cand.where())
                return None
            if cand.path is not None:
                path = str(cand.path)
            else:
                path = str(self.source.image_path(sha[:20], fmt))
        if min(width, height) < self.min_side:
            reason = f"too small ({width}x{height}; images.min_side is {self.min_side})"
            self.stage.skip(reason, kind="too_small", **cand.where())
            return None
        self._first_copy[sha] = where
        record = ImageRecord(
            id=sha[:20],
            path=path,
            sha256=sha,
            width=width,
            height=height,
            source=self.source.kind,
            source_id=cand.source_id,
            objects=list(cand.objects),
            captions=list(cand.captions),
        ).to_dict()
        self._check_matches_previous(record)
        if isinstance(self.source, HFSource) and item is not None:
            self.source.materialize(item.data, Path(path))
        self.kept.append(record)
        return record

    def _check_matches_previous(self, record: dict[str, Any]) -> None:
        index = len(self.kept)
        if index < len(self.previous) and self.previous[index] != record:
            raise InputError(
                f"{self.stage.output}: record {index + 1} ({self.previous[index].get('id')}) differs from what this "
                f"config gives ({record['id']}): the file was made from other images or settings; use a new run_dir "
                "(or move the file away) so old and new results never mix"
            )

    def check_complete(self) -> None:
        """Refuse an output holding more records than this config gives (e.g. made with a larger n)."""
        if len(self.kept) < len(self.previous):
            raise InputError(
                f"{self.stage.output}: holds {len(self.previous)} records but this config gives {len(self.kept)}: "
                "the file was made with other settings; use a new run_dir (or move the file away) so old and new "
                "results never mix"
            )


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Collect the run's images into `01_images.jsonl`; resumable, and deterministic for a given config."""
    sec: ImagesConfig = cfg.section
    stage = Stage("images", cfg)
    stage.claim()  # one run of this stage per run directory at a time
    exclusion = load_exclusion(sec.exclude, sec.extensions)
    source = open_source(sec, stage.run_dir)

    for name in getattr(source, "unnamed", []):
        stage.skip("file name is not valid UTF-8 (rename the file to use it)", kind="bad_name", path=name)
    excluded_early: Counter[str] = Counter()  # by name, path or source id: decided before reading any bytes
    available = []
    for cand in source.candidates:
        reason = exclusion.match_candidate(cand)
        if reason:
            excluded_early[reason] += 1
        else:
            available.append(cand)
    order = sampling_order(available, sec.n, cfg.common.seed)
    target = min(sec.n, len(order)) if sec.n else len(order)

    selection = ImageSelection(stage, source, exclusion, sec.min_side)
    output: list[JsonlAppender] = []  # opened at the first write: every earlier record has been re-checked by then

    def write(records: list[dict[str, Any]]) -> None:
        if not output:
            output.append(stage.open_output())
        output[0].write(records)

    read_chunk = HF_READ_CHUNK if isinstance(source, HFSource) else 1
    batch: list[dict[str, Any]] = []
    bar = progress(target, 0, "images")
    position = 0
    try:
        while len(selection.kept) < target and position < len(order):
            # Never read more candidates than could still be needed: sampling n from a huge source stays cheap.
            chunk = order[position : position + min(read_chunk, target - len(selection.kept))]
            position += len(chunk)
            loaded = source.read([c for c in chunk if selection.needs_reading(c)])
            for cand in chunk:
                record = selection.examine(cand, next(loaded) if selection.needs_reading(cand) else None)
                if record is None:
                    continue
                batch.append(record)
                bar.update(1)
                if len(batch) >= WRITE_BATCH and len(selection.kept) > len(selection.previous):
                    write(batch)
                    batch = []
        selection.check_complete()
        if selection.kept:
            write(batch)
    finally:
        bar.close()
        if output:
            output[0].close()

    excluded = excluded_early + selection.excluded
    if not selection.kept:
        write_jsonl(stage.errors_path, stage.errors)
        raise InputError(
            f"{source.root}: no usable images left ({len(source.candidates)} found, {sum(excluded.values())} "
            f"excluded, {len(stage.errors)} unusable — reasons in {stage.errors_path})"
        )
    stats = {
        "source": source.kind,
        "path": os.path.abspath(source.root),
        "requested": sec.n,
        "candidates": len(source.candidates),
        "examined": selection.examined,
        "images": len(selection.kept),
        "new": len(selection.kept) - len(selection.previous),
        "duplicates": selection.duplicates,
        "duplicate_examples": selection.duplicate_examples,
        "excluded": sum(excluded.values()),
        "excluded_by": dict(excluded),
        "exclude_entries": exclusion.entries,
        "unusable_by_kind": dict(Counter(e["kind"] for e in stage.errors)),
        **source.stats,
    }
    return stage.finish(stats, summarize(stats, sec, cfg.common.seed, len(selection.previous)))


def summarize(stats: dict[str, Any], sec: ImagesConfig, seed: int, resumed: int) -> str:
    """The closing paragraph: how many images, from where, and what was left out."""
    if sec.n:
        how = f"a seeded sample (n={sec.n}, seed {seed}) of {stats['candidates']} candidates"
        if stats["images"] < sec.n:
            how += f"; only {stats['images']} usable images exist"
    else:
        how = f"all {stats['candidates']} candidates"
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(stats["unusable_by_kind"].items()))
    text = (
        f"Took {stats['images']} images from the {stats['source']} source {stats['path']} ({how}). "
        f"Left out: {sum(stats['unusable_by_kind'].values())} unusable file(s){f' ({kinds})' if kinds else ''}, "
        f"{stats['duplicates']} duplicate(s) by content, {stats['excluded']} excluded by images.exclude "
        f"({stats['exclude_entries']} entries)."
    )
    if "coco_annotated_images" in stats:
        text += (
            f" COCO: {stats['coco_annotated_on_disk']} of the images on disk have annotations, "
            f"{stats['coco_unannotated_on_disk']} have none (empty objects)."
        )
    if resumed:
        text += f" {resumed} image(s) were already written by an earlier run; {stats['new']} added now."
    return text


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (`1_prepare_images.py`)."""
    run_cli(lambda a: run(load_config("images", a, __doc__)), argv)
