import json

import pytest

from capdpo.errors import InputError
from capdpo.jsonl import JsonlAppender, read_jsonl, stable_id


def test_stable_id_depends_on_every_part_and_order_of_keys_not():
    assert stable_id("a", {"x": 1, "y": 2}) == stable_id("a", {"y": 2, "x": 1})
    assert stable_id("a", 1) != stable_id("a", 2) != stable_id("b", 2)


def test_appender_repairs_torn_tail_and_skips_known_ids(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "te')
    out = JsonlAppender(path)
    assert out.ids == {"a"} and out.repaired_bytes > 0
    assert out.write([{"id": "a"}, {"id": "b"}, {"id": "b"}]) == 1
    out.close()
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]


def test_reader_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"id": 1}\n{"id": 2')
    with pytest.raises(InputError, match=r"x\.jsonl:2: truncated last line"):
        read_jsonl(path)
    assert read_jsonl(path, allow_torn_tail=True) == [{"id": 1}]
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: expected a JSON object"):
        read_jsonl(path)


class FullDisk:
    """A file whose writes fail as on a full disk; everything else goes to the real file."""

    def __init__(self, real):  # noqa: ANN001
        self.real = real

    def write(self, data):  # noqa: ANN001
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):  # noqa: ANN001
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # noqa: ANN002
        self.real.close()


def test_a_full_disk_is_one_line_naming_the_file_and_loses_no_record(tmp_path, monkeypatch):
    import os

    import pytest

    from capdpo import jsonl
    from capdpo.errors import InputError
    from capdpo.jsonl import JsonlAppender, read_jsonl, write_json

    path = tmp_path / "out.jsonl"
    with JsonlAppender(path) as out:
        out.write([{"id": "a"}, {"id": "b"}])
        real = out._fh
        out._fh = FullDisk(real)
        with pytest.raises(InputError, match=r"out.jsonl: the disk is full \(.* MiB free; writing this needs") as err:
            out.write([{"id": "c"}])
        out._fh = real
        assert "\n" not in str(err.value)
        assert "c" not in out.ids  # a rerun will write it
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b"}]  # the finished records, whole

    real_fdopen = os.fdopen
    monkeypatch.setattr(jsonl.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(InputError, match="meta.json: the disk is full"):
        write_json(tmp_path / "meta.json", {"x": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no stray temporary file


def test_run_units_prepares_each_unfinished_unit_before_the_work_on_the_one_before(tmp_path):
    from capdpo.run import run_units

    out = JsonlAppender(tmp_path / "out.jsonl")
    out.write([{"id": "b1"}, {"id": "b2"}])  # unit b is finished: never prepared, never worked
    events = []
    units = [["a1"], ["b1", "b2"], ["c1"], ["d1", "d2"]]

    def work(unit):
        events.append(("work", unit[0]))
        return [{"id": rid} for rid in unit]

    written = run_units(units, out, lambda u: u, work, "test", prepare=lambda u: events.append(("prepare", u[0])))
    assert written == 4
    assert events == [("prepare", "a1"), ("prepare", "c1"), ("work", "a1"), ("prepare", "d1"), ("work", "c1"),
                      ("work", "d1")]  # fmt: skip


def test_whole_files_are_written_to_a_unique_temporary_file_and_renamed_into_place(tmp_path) -> None:
    """Two writers of one file never share a temporary file; a writer that fails leaves the old file whole."""
    from capdpo.jsonl import _atomic, write_text

    path = tmp_path / "stats.json"
    write_text(path, "old\n")
    with _atomic(path, "w") as first, _atomic(path, "w") as second:
        first.write("first\n")
        second.write("second\n")
        temporaries = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        assert len(temporaries) == 2 and all(t.startswith(".stats.json.") for t in temporaries)
        assert path.read_text() == "old\n"  # nothing replaced before a writer finishes
    assert path.read_text() == "first\n"  # the last writer to finish (the outer one) wins, whole
    with pytest.raises(RuntimeError), _atomic(path, "w") as fh:
        fh.write("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]
