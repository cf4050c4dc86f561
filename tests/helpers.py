"""Helpers for tests that run stages as real processes (crash-and-rerun, CLI errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
