"""Helpers for tests that run stages as real processes (crash-and-rerun, CLI errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a numbered script (or `-m module`) from the repo root; capture its output."""
    cmd = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def kill_when(script: str, args: list[str], watch: Path, min_lines: int, timeout: float = 600) -> int:
    """Start a script, SIGKILL it once `watch` has at least `min_lines` lines; return the lines it had.

    Fails the test if the script finishes before that (the crash would then test nothing).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if count_lines(watch) >= min_lines:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return count_lines(watch)
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(
                    f"{script} finished (rc={proc.returncode}) before it could be killed: {err[-2000:]}"
                )
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"{script} did not write {min_lines} lines to {watch} in {timeout} s")


def run_ranks(script: str, config: Path, world: int = 2, timeout: float = 600) -> None:
    """Run a numbered script as `world` ranks of one torchrun-style job (RANK / WORLD_SIZE set), all at once;
    fail the test with a rank's stderr if any rank fails."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), "--config", str(config)],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "RANK": str(r),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(r),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    for p in procs:
        assert p.wait(timeout=timeout) == 0, p.stderr.read().decode()[-2000:]


def check_bad_inputs(
    main: Any,
    capsys: Any,
    config: Path,
    source: Path,
    records: list[dict],
    field: str,
    model_flag: str,
    output_stem: str,
) -> None:
    """A stage's input file (`source`, whose finished `records` are on disk) missing, unfinished, torn or without
    `field`, and a missing model for `model_flag`: each run of the stage's command line (`main`, in this process)
    exits with code 2, prints one line naming the file (and line, and field, or the flag), and writes no record and
    no completion marker."""
    import pytest

    from capdpo.jsonl import write_jsonl

    run_dir, done = source.parent, source.with_suffix(".done")

    def refused(*extra: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config), *extra])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        output = run_dir / f"{output_stem}.jsonl"
        assert not (output.exists() and output.read_text()) and not (run_dir / f"{output_stem}.done").exists()
        return lines[0]

    text = source.read_text()
    source.unlink()
    message = refused()
    assert source.name in message and "not found" in message
    source.write_text(text)
    done.unlink()
    assert "has not finished" in refused()
    done.write_text("{}\n")
    first, second = text.splitlines()[:2]
    source.write_text(first + "\n" + second[: len(second) // 2] + "\n")  # a torn line in a finished file
    assert f"{source.name}:2" in refused()
    broken = {k: v for k, v in records[1].items() if k != field}
    write_jsonl(source, [records[0], broken])
    message = refused()
    assert f"{source.name}:2" in message and field in message
    write_jsonl(source, records)
    message = refused(f"--{model_flag}", str(run_dir.parent / "no_model"))
    assert model_flag in message and "no_model" in message


def check_ranks_merge(script: str, configs: dict[str, Path], output: str, records: int) -> None:
    """`script` run once in one process (configs["single"]) and as two ranks (configs["sharded"]): the merged
    `output` holds exactly the single run's `records` records, the completion marker, and no rank file."""
    from capdpo.jsonl import read_jsonl

    assert run_script(script, "--config", str(configs["single"])).returncode == 0
    run_ranks(script, configs["sharded"])
    import yaml

    single_dir, sharded_dir = (Path(yaml.safe_load(configs[n].read_text())["run_dir"]) for n in ("single", "sharded"))
    key = lambda r: r["id"]  # noqa: E731
    single = sorted(read_jsonl(single_dir / f"{output}.jsonl"), key=key)
    merged = sorted(read_jsonl(sharded_dir / f"{output}.jsonl"), key=key)
    assert len(single) == records and merged == single
    assert (sharded_dir / f"{output}.done").exists()
    assert not list(sharded_dir.glob(f"{output}.rank*"))
