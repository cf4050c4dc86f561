"""Snapshots of the two demo runs (stages 1-6), to prove a refactor leaves every record unchanged.

`snapshot(run_dir)` reads what the numbered scripts wrote (stage records, exports, stats, the DPO log) and
normalises what legitimately differs between two runs: the checkout's and the run's absolute paths, timings.
`compare(expected, actual)` lists every difference, with floats equal within a tolerance (scores and losses
computed on another CPU may differ in the last bits).

    python -m tests.regression --update   # rewrite tests/data/regression/*.json.gz from the current code

Only run `--update` for a change that is meant to change records, and say so in the commit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "regression"
SCRIPTS = (
    "1_prepare_images.py",
    "2_generate_descriptions.py",
    "3_regenerate_sentences.py",
    "4_validate_sentences.py",
    "5_build_dpo_dataset.py",
    "6_train_dpo.py",
)
STAGE_FILES = ("01_images", "02_descriptions", "03_variants", "04_scores", "05_pairs")
# keys whose values are timings or machine facts, never part of what a run computes
VOLATILE = {
    "seconds",
    "train_seconds",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "pairs_per_second",
    "peak_gpu_memory_gib",
    "total_flos",
}
# Reward accuracies count the pairs whose margin is above zero. Early in a run the adapter has barely moved, so some
# margins are ~1e-7, rounding noise whose sign depends on the CPU's summation order: one such pair flips a 7-pair
# step's accuracy by 1/7, the 4-step mean the snapshot keeps by 1/28. Those fields compare within one pair's share;
# the margins and losses themselves stay within the tight float tolerance. Token accuracies count argmax matches
# the same way: a near-tie of two logits flips one token, a few 1e-4 of the demo's mean over its steps.
COUNT_TOLERANCES = {"accuracies": 0.04, "token_accuracy": 1e-3}
DEMOS = {"synthetic_demo": "configs/synthetic_demo.yaml", "demo": "configs/demo.yaml"}
# a smaller synthetic demo keeps the test quick; every stage and setting of the demo still runs
SMALLER = {"synthetic_demo": {"images": {"n": 24}, "describe": {"samples_per_image": 2}, "train": {"epochs": 2}}}


def workdir(base: Path, tiny_models: Path | None = None) -> Path:
    """A working directory that holds the demos' relative paths (models/, capdpo/assets/), so record ids, which
    name the models by their configured path, are those of a run from the checkout."""
    work = base / "work"
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "capdpo").mkdir(exist_ok=True)
    os.symlink(ROOT / "models" / "synthetic", work / "models" / "synthetic")
    os.symlink(ROOT / "capdpo" / "assets", work / "capdpo" / "assets")
    if tiny_models is not None:
        os.symlink(tiny_models, work / "models" / "tiny")
    return work


def run_demo(name: str, work: Path, run_dir: Path) -> None:
    """Stages 1-6 of one demo config, in this process, as `scripts/run_all.sh` runs them (on the CPU)."""
    from capdpo.pipeline import STAGES, run_stage

    config = yaml.safe_load((ROOT / DEMOS[name]).read_text())
    config["run_dir"] = str(run_dir)
    config["device"] = "cpu"
    for section, values in SMALLER.get(name, {}).items():
        config[section] = {**config[section], **values}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    previous = os.getcwd()
    os.chdir(work)  # the demo configs name models and images relative to the checkout
    try:
        for info in STAGES:
            run_stage(info.section, ["--config", str(path)])
    finally:
        os.chdir(previous)


def _normalise(value: Any, replace: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for old, new in replace:
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _normalise(v, replace) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalise(v, replace) for v in value]
    return value


def _read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def snapshot(run_dir: Path, work: Path) -> dict[str, Any]:
    """What a demo run computed, normalised (see the module docstring)."""
    replace = sorted(
        {(str(run_dir.resolve()), "<run>"), (str(run_dir), "<run>"), (str(work), "<work>"), (str(ROOT), "<root>")},
        key=lambda p: -len(p[0]),
    )
    snap: dict[str, Any] = {}
    for stem in STAGE_FILES:
        records = _read_jsonl(run_dir / f"{stem}.jsonl")
        snap[f"{stem}.jsonl"] = sorted(_normalise(records, replace), key=lambda r: r["id"])
        snap[f"{stem}.stats.json"] = _normalise(json.loads((run_dir / f"{stem}.stats.json").read_text()), replace)
        snap[f"{stem}.errors.jsonl"] = _normalise(_read_jsonl(run_dir / f"{stem}.errors.jsonl"), replace)
    for path in sorted((run_dir / "05_exports").iterdir()):
        text = path.read_text(encoding="utf-8")
        data = _read_jsonl(path) if path.suffix == ".jsonl" else json.loads(text)
        snap[f"05_exports/{path.name}"] = _normalise(data, replace)
    log = _read_jsonl(run_dir / "06_train" / "log.jsonl")
    snap["06_train/log.jsonl"] = _normalise(log, replace)
    summary = json.loads((run_dir / "06_train" / "summary.json").read_text())
    keep = ("train_pairs", "val_pairs", "steps", "epochs", "final_loss", "train_loss", "final_rewards", "eval")
    snap["06_train/summary.json"] = _normalise({k: summary[k] for k in keep}, replace)
    return snap


def compare(expected: Any, actual: Any, where: str = "", rel: float = 1e-4, abs_tol: float = 1e-5) -> list[str]:
    """Every difference between two snapshots (floats within `rel`/`abs_tol`), as 'where: expected != actual'."""
    if (
        isinstance(expected, bool)
        or isinstance(actual, bool)
        or not (isinstance(expected, (int, float)) and isinstance(actual, (int, float)))
    ):
        if type(expected) is not type(actual):
            return [f"{where}: {expected!r} != {actual!r}"]
    if isinstance(expected, dict):
        diffs = [f"{where}.{k}: missing" for k in expected if k not in actual]
        diffs += [f"{where}.{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                tol = max([abs_tol] + [t for end, t in COUNT_TOLERANCES.items() if str(k).endswith(end)])
                diffs += compare(expected[k], actual[k], f"{where}.{k}", rel, tol)
        return diffs
    if isinstance(expected, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items != {len(actual)}"]
        return [
            d for i, (e, a) in enumerate(zip(expected, actual)) for d in compare(e, a, f"{where}[{i}]", rel, abs_tol)
        ]
    if isinstance(expected, float) or isinstance(actual, float):
        if math.isnan(expected) and math.isnan(actual):
            return []
        return (
            []
            if math.isclose(expected, actual, rel_tol=rel, abs_tol=abs_tol)
            else [f"{where}: {expected} != {actual}"]
        )
    if isinstance(expected, str) and expected != actual and where.endswith("_json"):
        try:  # a JSON document inside a field (an export's meta_json): its floats compare as floats
            return compare(json.loads(expected), json.loads(actual), where, rel, abs_tol)
        except ValueError:
            pass
    return [] if expected == actual else [f"{where}: {expected!r} != {actual!r}"]


def load_expected(name: str) -> dict[str, Any]:
    with gzip.open(DATA / f"{name}.json.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)


def build_snapshots(base: Path, tiny_models: Path) -> dict[str, dict[str, Any]]:
    work = workdir(base, tiny_models)
    snaps = {}
    for name in DEMOS:
        run_dir = base / "runs" / name
        run_demo(name, work, run_dir)
        snaps[name] = snapshot(run_dir, work)
    return snaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="Rewrite the stored snapshots from this checkout.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        tiny = base / "tiny"
        # the tiny models as `make demo-photos` builds them
        subprocess.run([sys.executable, "-c", f"from capdpo.models.tiny import build_all; build_all({str(tiny)!r})"],
                       check=True, env=env, cwd=ROOT)  # fmt: skip
        snaps = build_snapshots(base, tiny)
        for name, snap in snaps.items():
            if args.update:
                DATA.mkdir(parents=True, exist_ok=True)
                with gzip.open(DATA / f"{name}.json.gz", "wt", encoding="utf-8", compresslevel=9) as fh:
                    json.dump(snap, fh, sort_keys=True)
                print(f"{name}: written")
            else:
                diffs = compare(load_expected(name), snap, name)
                print(f"{name}: {len(diffs)} difference(s)", *diffs[:20], sep="\n  ")
        shutil.rmtree(base / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
