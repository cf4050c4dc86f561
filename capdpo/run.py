"""What every stage does around its work: input checks, provenance, stats, errors, the completion marker."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from capdpo.config import LoadedConfig
from capdpo.errors import InputError
from capdpo.jsonl import JsonlAppender, iter_jsonl, iter_numbered, stable_id, write_json, write_jsonl, write_text
from capdpo.pipeline import stage as stage_info
from capdpo.provenance import now, provenance
from capdpo.records import R


class Stage:
    """One stage's files in a run directory.

    `<run_dir>/<NN_name>.jsonl` (or a folder, for training) is the output; beside it `<NN_name>.meta.json`
    (provenance: resolved config, versions, git commit, command), `.config.yaml`, `.stats.json`, `.errors.jsonl`
    (inputs skipped, with the reason) and `.done` (the completion marker, written last).

    Args:
        section: the stage's YAML section (`capdpo.pipeline` knows its output), or any name when `output` is given.
        cfg: the loaded config.
        output: the output file or folder, for tools that are not pipeline stages (SFT); its bookkeeping files
            sit beside it.
    """

    def __init__(self, section: str, cfg: LoadedConfig, output: Path | None = None) -> None:
        self.name = section
        self.cfg = cfg
        self.run_dir = Path(cfg.common.run_dir)
        self.output = output if output is not None else self.run_dir / stage_info(section).output
        self.output.parent.mkdir(parents=True, exist_ok=True)
        stem = self.output.parent / self._stem
        self.meta_path = Path(f"{stem}.meta.json")
        self.config_path = Path(f"{stem}.config.yaml")
        self.stats_path = Path(f"{stem}.stats.json")
        self.errors_path = Path(f"{stem}.errors.jsonl")
        self.done_path = Path(f"{stem}.done")
        self.errors: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.started = time.time()
        self._locks: list[Any] = []

    # ---- inputs -------------------------------------------------------------------------------------------
    def read_input(self, previous: str) -> list[dict[str, Any]]:
        """Records of a previous stage; refuses an unfinished one unless `allow_partial`, an empty one unless
        `allow_empty`."""
        return [record for _, record in self.read_numbered(previous)]

    def read_numbered(self, previous: str) -> list[tuple[int, dict[str, Any]]]:
        """(line number, record) of a previous stage's records (see `read_input`)."""
        info = stage_info(previous)
        path = self.run_dir / info.output
        done = self.run_dir / f"{info.stem}.done"
        if not path.exists():
            raise InputError(f"{path}: not found — run `python {info.script} --config ...` first")
        partial = not done.exists()
        if partial and not self.cfg.common.allow_partial:
            raise InputError(
                f"{path}: stage '{previous}' has not finished (no {done.name}); rerun "
                f"{info.script} to complete it, or pass --allow_partial to use its finished records"
            )
        records = list(iter_numbered(path, allow_torn_tail=partial))
        if not records and not self.cfg.common.allow_empty:
            raise InputError(
                f"{path}: holds no records — stage '{previous}' produced nothing (see its errors file); fix its "
                "input, or pass --allow_empty to run this stage on nothing"
            )
        return records

    def read_records(self, previous: str, cls: type[R], image_field: str = "") -> list[R]:
        """A previous stage's records as `cls` dataclasses; a record with a missing field, or (with `image_field`)
        naming an image file that is not there, is an `InputError` naming the file and line."""
        import os

        path = self.run_dir / stage_info(previous).output
        records, present = [], set()
        for line, data in self.read_numbered(previous):
            record = cls.from_dict(data, f"{path}:{line}")
            image = getattr(record, image_field) if image_field else None
            if image is not None and image not in present:
                if not os.path.isfile(image):
                    raise InputError(
                        f"{path}:{line}: image {image} not found (moved or deleted since that stage ran?); restore it "
                        "or rerun stage 1 into a new run_dir"
                    )
                present.add(image)
            records.append(record)
        return records

    # ---- outputs ------------------------------------------------------------------------------------------
    def open_output(self, planned_ids: set[str] | None = None) -> JsonlAppender:
        """Open the output for appending; refuse when it holds records this config would not produce.

        Under `torchrun` (WORLD_SIZE > 1) each rank appends to its own `NN_name.rank<r>.jsonl` and skips what
        any rank, or the merged file, already holds; `gather` merges them.
        """
        self.claim()
        rank, world = shard()
        finished: set[str] = set()
        for path in [self.output, *sorted(self.run_dir.glob(f"{self._stem}.rank*.jsonl"))]:
            if path.exists():
                finished |= {r["id"] for r in iter_jsonl(path, allow_torn_tail=True)}
        stale = finished - planned_ids if planned_ids is not None else set()
        if stale:  # checked before anything is touched: a refused run changes no file
            raise InputError(
                f"{self.output}: holds {len(stale)} record(s) made from other inputs or settings than this "
                "run's; use a new run_dir (or move the file away) so old and new results never mix"
            )
        if rank == 0:
            self.done_path.unlink(missing_ok=True)
            self.write_meta()
        out = JsonlAppender(self._rank_path(rank) if world > 1 else self.output)
        out.ids |= finished
        self.counts["resumed"] = len(finished)
        return out

    @property
    def _stem(self) -> str:
        return self.output.name.removesuffix(".jsonl")

    # ---- one writer at a time -------------------------------------------------------------------------------------
    def claim(self) -> None:
        """Take this stage's lock in the run directory before anything is read or written for the output.

        A second run of the same stage on the same run directory (another process) is refused at once with a
        one-line `InputError` naming the holder. The system releases the lock when its process ends, however it
        ends, so a killed run never blocks the next. Under `torchrun` every rank holds its own shard's lock and
        rank 0 also the stage's, so ranks of one run work side by side and a second run is still refused.
        Released by `finish`; the same process may claim again (a rerun in one process, e.g. tests).
        """
        if self._locks:
            return
        rank, world = shard()
        names = [f"{self._stem}.lock"] if rank == 0 else []
        if world > 1:
            names.append(f"{self._stem}.rank{rank}.lock")
        for name in names:  # kept apart in .locks/ (the files stay; only the OS lock on them matters)
            self._locks.append(_claim(self.output.parent / ".locks" / name, self.name))
        self._remove_orphan_temporaries(rank, world)

    def _remove_orphan_temporaries(self, rank: int, world: int) -> None:
        """Delete the temporary files (`jsonl.write_*`: `.NAME.<random>.tmp`) that a killed run of this stage left beside
        its outputs. Under the lock no other process writes them: each rank removes only those of the files it
        writes (its shard's; rank 0 also the stage's own)."""
        own = f".{self._stem}.rank{rank}." if world > 1 else f".{self._stem}."
        for path in self.output.parent.glob(f".{self._stem}.*.tmp"):
            stage_file = rank == 0 and ".rank" not in path.name  # any rank's file (e.g. a claims cache) has it
            if path.is_file() and (path.name.startswith(own) or stage_file):
                path.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the stage's locks back (the holder notes stay; they only matter while a lock is held)."""
        for lock in self._locks:
            lock.release(force=True)
        self._locks = []

    def input_finished(self, previous: str) -> bool:
        """Whether stage `previous` has written its completion marker in this run directory."""
        return (self.run_dir / f"{stage_info(previous).stem}.done").exists()

    def _rank_path(self, rank: int) -> Path:
        return self.run_dir / f"{self._stem}.rank{rank}.jsonl"

    def gather(self, poll_seconds: float = 2.0) -> bool:
        """After the work: merge the ranks' files (rank 0, once every rank is done). Returns whether this
        process should go on to write stats and the completion marker (rank 0, or a single process)."""
        rank, world = shard()
        if world == 1:
            return True
        (self.run_dir / f"{self._stem}.rank{rank}.done").write_text("{}\n")
        if rank != 0:
            return False
        waiting = [r for r in range(world) if not (self.run_dir / f"{self._stem}.rank{r}.done").exists()]
        while waiting:
            time.sleep(poll_seconds)
            waiting = [r for r in waiting if not (self.run_dir / f"{self._stem}.rank{r}.done").exists()]
        with JsonlAppender(self.output) as merged:
            for r in range(world):
                if self._rank_path(r).exists():
                    merged.write(iter_jsonl(self._rank_path(r), allow_torn_tail=True))
        for r in range(world):  # only after the merged file is on disk: a crash here loses nothing
            self._rank_path(r).unlink(missing_ok=True)
            (self.run_dir / f"{self._stem}.rank{r}.done").unlink(missing_ok=True)
        return True

    def write_meta(self) -> None:
        """Provenance and the resolved config beside the output (written when a run starts)."""
        write_json(self.meta_path, provenance(self.cfg.resolved(), stage=self.name))
        text = yaml.safe_dump(self.cfg.resolved(), sort_keys=False, allow_unicode=True)
        write_text(self.config_path, text)

    def skip(self, reason: str, **where: Any) -> None:
        """Record an input this stage had to leave out, with the reason; the rest goes on."""
        self.errors.append({**where, "reason": reason})
        self.counts["skipped"] += 1

    def finish(self, stats: dict[str, Any], summary: str) -> dict[str, Any]:
        """Write errors, stats and the completion marker; print the summary paragraph."""
        write_jsonl(self.errors_path, self.errors)
        stats = {**dict(self.counts), **stats, "seconds": round(time.time() - self.started, 2)}
        write_json(self.stats_path, stats)
        write_text(self.done_path, json.dumps({"finished": now()}) + "\n")
        self.release()
        skipped = f" {len(self.errors)} input(s) skipped, reasons in {self.errors_path}." if self.errors else ""
        server = stats.get("server")
        if isinstance(server, dict):
            skipped += (
                f" Server: {server['requests']} requests, {server['requests_per_second']} requests/s, "
                f"{server['tokens_per_second']} tokens/s."
            )
        print(f"\n[{self.name}] {summary}{skipped} Output: {self.output} ({stats['seconds']:.1f} s).", flush=True)
        return stats


def _claim(path: Path, stage: str) -> Any:
    """Hold the lock at `path` (an OS lock on the file, released when this process ends) and note who holds it
    beside it, or refuse naming the holder."""
    import os
    import socket

    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), is_singleton=True, thread_local=False)
    note = path.with_name(path.name + ".holder.json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(note.read_text(encoding="utf-8"))
            who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise InputError(
            f"{path.parent.parent}: stage '{stage}' is already running here ({who}); wait for it to finish or stop it "
            f"(a killed run releases {path.name} by itself), or use another run_dir"
        ) from None
    write_json(note, {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "stage": stage})
    return lock


def progress(total: int, initial: int, desc: str) -> Any:
    """A progress bar with counts and ETA (on stderr, so stdout stays for summaries)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)


def shard() -> tuple[int, int]:
    """(rank, world size) of this process: set by `torchrun` / `accelerate launch`, else (0, 1)."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def owned_units(units: list[list[Any]], record_ids: Any) -> list[list[Any]]:
    """The units this process works on: all of them, or under `torchrun` those whose first id hashes to its rank."""
    rank, world = shard()
    if world == 1:
        return units
    return [u for u in units if int(stable_id(record_ids(u)[0]), 16) % world == rank]


def run_units(
    units: list[list[Any]],
    out: JsonlAppender,
    record_ids: Any,
    work: Any,
    desc: str,
    prepare: Any = None,
) -> int:
    """Run `work(unit) -> records` for every unit that still has unwritten records; append them per unit.

    Units are planned over the whole input, finished or not, so a resumed run computes each unfinished unit
    exactly as an uninterrupted run would (same batch, same padding, same numbers); only records whose id is
    not yet in the output are written. `prepare(unit)`, if given, is called for the first unfinished unit and then
    for each next one just before the work on the one before it, so it can start that unit's host work (tokenising,
    image processing) meanwhile. Returns the number of records written.
    """
    units = owned_units(units, record_ids)
    total = sum(len(record_ids(u)) for u in units)
    done = sum(1 for u in units for rid in record_ids(u) if rid in out.ids)
    todo = [u for u in units if any(rid not in out.ids for rid in record_ids(u))]
    written = 0
    with progress(total, done, desc) as bar:
        if prepare is not None and todo:
            prepare(todo[0])
        for i, unit in enumerate(todo):
            if prepare is not None and i + 1 < len(todo):
                prepare(todo[i + 1])
            n = out.write(work(unit))
            written += n
            bar.update(n)
    return written
