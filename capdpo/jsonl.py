"""The only place that reads and writes stage files: append-only JSONL, flushed per batch, torn tails repaired."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capdpo.errors import InputError


def stable_id(*parts: Any) -> str:
    """A short, stable hash of what produced a record (inputs, model, parameters)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def iter_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file (see `iter_numbered`)."""
    for _, record in iter_numbered(path, allow_torn_tail=allow_torn_tail):
        yield record


def iter_numbered(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for the records of a JSONL file (a byte-order mark at its start is allowed).

    Args:
        path: the file.
        allow_torn_tail: skip an incomplete last line (a write cut off by a crash) instead of failing.

    Raises:
        InputError: the file is missing, or a line is not a JSON object (named by file and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with path.open("rb") as fh:
        data = fh.read().removeprefix(b"\xef\xbb\xbf")
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # a finished file ends with a newline
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last and torn:
                if allow_torn_tail:
                    return
                raise InputError(
                    f"{path}:{number}: truncated last line (a crash mid-write?); rerun the stage that wrote it "
                    "to redo that record"
                ) from None
            raise InputError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if last and torn and not allow_torn_tail:
            raise InputError(f"{path}:{number}: last line has no newline (a crash mid-write?)")
        yield number, record


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> list[dict[str, Any]]:
    """All records of a JSONL file (see `iter_jsonl`)."""
    return list(iter_jsonl(path, allow_torn_tail=allow_torn_tail))


def foreign_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file written by another tool: CRLF line ends and a missing last newline
    are fine (no torn-tail check, which only capdpo's own append-only files need)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def repair_torn_tail(path: Path) -> int:
    """Cut an incomplete last line off a JSONL file; return the number of bytes removed."""
    if not path.exists():
        return 0
    with path.open("rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            cut = len(data)
        else:
            cut = data.rfind(b"\n") + 1
        # A line can end in a newline and still be garbage only if something else wrote it; that is an error
        # the reader reports. Here only the unfinished tail is dropped: it is work to redo, not work done.
        if cut < len(data):
            fh.truncate(cut)
        return len(data) - cut


class JsonlAppender:
    """Append-only writer that knows which ids a file already holds.

    Opening repairs a torn last line; `write` appends whole records and flushes them to disk, so a kill at any
    moment loses at most the batch being written.
    """

    def __init__(self, path: str | Path, id_field: str = "id") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(self.path)
        self.id_field = id_field
        self.ids: set[str] = set()
        if self.path.exists():
            for record in iter_jsonl(self.path):
                if id_field not in record:
                    raise InputError(f"{self.path}: a record has no '{id_field}' field")
                self.ids.add(record[id_field])
        self._fh = self.path.open("ab")

    def write(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records whose id is new; return how many were written."""
        chunks = []
        for record in records:
            rid = record[self.id_field]
            if rid in self.ids:
                continue
            self.ids.add(rid)
            chunks.append(json.dumps(record, ensure_ascii=False) + "\n")
        if chunks:
            data = "".join(chunks).encode("utf-8")
            start = self._fh.tell()
            try:
                self._fh.write(data)
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as err:
                # nothing half-written stays: the file ends at its last whole record, as before this write
                self._fh.truncate(start)
                self.ids -= {json.loads(c)[self.id_field] for c in chunks}
                raise disk_error(err, self.path, len(data)) from None
        return len(chunks)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_error(err: OSError, path: Path, needed: int) -> Exception:
    """A full disk (or quota) as a one-line `InputError` naming the file and the space needed; other OS errors
    unchanged."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return InputError(
        f"{path}: the disk is full ({free / 2**20:.1f} MiB free; writing this needs at least {needed / 2**20:.1f} MiB "
        "more); free some space and rerun the same command — finished records are kept"
    )


@contextmanager
def _atomic(path: Path, mode: str) -> Any:
    """A temporary file beside `path` (a unique name: two writers never share one) that replaces `path` when the
    block ends, and is removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, path)
    except OSError as err:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(err, path, max(written, 1 << 20)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file, then rename)."""
    with _atomic(Path(path), "w") as fh:
        fh.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically (temp file, then rename)."""
    with _atomic(Path(path), "wb") as fh:
        fh.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename), so a reader never sees half a file."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    with _atomic(Path(path), "w") as fh:
        fh.write(text)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write a whole JSONL file atomically; return the number of records."""
    n = 0
    with _atomic(Path(path), "w") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path: str | Path) -> Any:
    """Read a JSON file with a one-line error naming the file (and line) when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
