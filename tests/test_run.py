"""capdpo.run: one writer per stage and run directory; a dead holder never blocks; ranks work side by side."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capdpo.errors import InputError
from tests.helpers import ROOT, run_script
from tests.pipeline import write_config, write_images_stage

HOLD = """
import sys, time
from capdpo.sections import load_config
from capdpo.run import Stage
stage = Stage(sys.argv[2], load_config(sys.argv[2], ["--config", sys.argv[1]]))
stage.claim()
print("held", flush=True)
time.sleep(600)
"""


def hold(config: Path, section: str, **env: str) -> subprocess.Popen:
    """A process that claims `section`'s lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(config), section],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def run_setup(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    write_images_stage(run_dir, sample_images[:2])
    return run_dir, write_config(tmp_path / "run.yaml", run_dir, tiny_models)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(run_setup) -> None:
    run_dir, config = run_setup
    holder = hold(config, "describe")
    try:
        started = time.time()
        second = run_script("2_generate_descriptions.py", "--config", str(config))
        assert time.time() - started < 60  # refused at once, not after waiting
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert f"process {holder.pid} on " in lines[0] and "already running" in lines[0]
        assert re.search(r", started \d{4}-\d\d-\d\d", lines[0]), lines[0]  # when the holder started
        assert not (run_dir / "02_descriptions.jsonl").exists()  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: the next run goes ahead and finishes
    third = run_script("2_generate_descriptions.py", "--config", str(config))
    assert third.returncode == 0, third.stderr
    ids = [line for line in (run_dir / "02_descriptions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 2 * 2  # 2 images x 2 samples, each once


def test_ranks_of_one_run_hold_their_own_locks_and_a_single_run_is_still_refused(run_setup) -> None:
    _, config = run_setup
    ranks = [hold(config, "validate", RANK=str(r), WORLD_SIZE="2") for r in range(2)]  # both are granted
    try:
        single = run_script("4_validate_sentences.py", "--config", str(config))
        assert single.returncode == 2 and "already running" in single.stderr
        with pytest.raises(InputError, match=f"process {ranks[1].pid} "):  # a second rank 1 is refused too
            from capdpo.run import _claim

            _claim(config.parent / "run" / ".locks" / "04_scores.rank1.lock", "validate")
    finally:
        for proc in ranks:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_the_same_process_may_claim_again(run_setup) -> None:
    from capdpo.run import Stage
    from capdpo.sections import load_config

    _, config = run_setup
    cfg = load_config("pairs", ["--config", str(config)])
    first, second = Stage("pairs", cfg), Stage("pairs", cfg)
    first.claim()
    second.claim()  # e.g. a stage rerun in one process after an error
    first.release()
    second.release()


def test_claiming_removes_only_the_temporary_files_a_killed_run_of_this_process_would_have_written(
    run_setup, monkeypatch
) -> None:
    """A SIGKILL mid-write leaves `jsonl`'s `.NAME.<random>.tmp` behind; the next claim of the same stage removes it.
    Under torchrun a rank removes only its own shard's (rank 0 also the stage's), never another rank's or stage's."""
    from capdpo.run import Stage
    from capdpo.sections import load_config

    run_dir, config = run_setup
    names = {
        "stage": ".03_variants.jsonl.ab12.tmp",
        "meta": ".03_variants.meta.json.cd34.tmp",
        "rank0": ".03_variants.rank0.jsonl.ef56.tmp",
        "rank1": ".03_variants.rank1.jsonl.gh78.tmp",
        "rank1 cache": ".03_variants.cache.rank1.jsonl.kl12.tmp",
        "other stage": ".02_descriptions.jsonl.ij90.tmp",
        "not temporary": ".03_variants.jsonl.keep",
    }

    def claim_as(rank: int, world: int) -> set[str]:
        for name in names.values():
            (run_dir / name).write_text("half")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stage = Stage("variants", load_config("variants", ["--config", str(config)]))
        stage.claim()
        stage.release()
        return {label for label, name in names.items() if not (run_dir / name).exists()}

    assert claim_as(1, 2) == {"rank1"}
    assert claim_as(0, 2) == {"stage", "meta", "rank0"}
    assert claim_as(0, 1) == {"stage", "meta", "rank0", "rank1", "rank1 cache"}
