"""The GPU benchmarks' --tiny mode runs on CPU in seconds, so a broken benchmark fails CI, not a GPU session."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("script", "extra"),
    [("bench/generate.py", ["--compare-windows", "32", "2"]), ("bench/validate.py", ["--also", "4x1"])],
)
def test_benchmark_tiny_mode_runs_and_reports_ratios(tmp_path, script, extra):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--tiny", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["speedup"] > 0 and data["env"]["torch"]
    assert "vs baseline" in result.stdout or "capdpo / baseline" in result.stdout
    if script == "bench/generate.py":  # the other window steps are timed at the best batch
        best = max(data["capdpo"], key=lambda e: e["images_per_s"])["batch"]
        assert [(w["window_step"], w["batch"]) for w in data["capdpo_window_steps"]] == [(32, best), (2, best)]
        assert data["window_step"] == 0  # the stages' default: the whole cache
        assert all(w["images_per_s"] > 0 for w in data["capdpo_window_steps"])
    else:  # the other shape is timed on the same groups
        [also] = data["capdpo_shared_prefix_also"]
        assert (also["batch"], also["images_per_pass"]) == (4, 1) and also["candidates_per_s"] > 0


def test_levers_tiny_mode_measures_every_part():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/levers.py"), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "rope equal: True True" in result.stdout
    assert result.stdout.count("decode") == 4 and "fused 7 text modules" in result.stdout


def test_device_busy_time_counts_overlapping_kernels_once():
    from bench.common import covered

    assert covered([]) == 0
    assert covered([(0, 10), (5, 12), (20, 25), (21, 22), (12, 13)]) == 18  # 0-13 and 20-25
    assert covered([(30, 40), (0, 5)]) == 15


def test_idle_device_time_is_charged_to_the_host_operator_running_meanwhile():
    from bench.common import idle_by_host_op

    kernels = [(10, 20), (30, 40), (35, 50)]  # idle: 0-10, 20-30, 50-60
    ops = [(0, 6, "aten::copy_"), (22, 25, "aten::isfinite"), (25, 28, "aten::isfinite"), (52, 70, "Optimizer.step")]
    waits = dict(idle_by_host_op(kernels, ops, 0, 60))
    assert waits == {"aten::copy_": 6, "aten::isfinite": 6, "Optimizer.step": 8, "(no operator: Python)": 10}
    assert sum(waits.values()) == 30  # every idle moment counted once
