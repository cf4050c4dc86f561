"""The ground-truth report of a synthetic run: its figures by hand, and `make demo`'s steps end to end on a part of
the bundled images with the shipped models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from capdpo.jsonl import iter_jsonl, write_jsonl
from capdpo.synthetic.scoring import planted_hallucinations
from capdpo.synthetic.truth_report import description_quality, format_report, verifier_quality
from capdpo.synthetic.world import BiasRule, Scene, SceneObject

ROOT = Path(__file__).resolve().parents[2]
SCENE = Scene(
    [SceneObject("square", "blue", "small", "bottom right"), SceneObject("circle", "red", "large", "top left")]
)
RIGHT = "There is a small blue square at the bottom right."
WRONG = "There is a small blue triangle at the bottom right."


def test_verifier_and_description_figures_by_hand(tmp_path: Path) -> None:
    scores = [
        {
            "image_id": "a",
            "candidates": [
                {"text": RIGHT, "score": 0.9},  # right, accepted
                {"text": WRONG, "score": 0.7},  # wrong, accepted: a verifier mistake
                {"text": "There is a large red circle at the top left.", "score": 0.2},  # right, rejected
                {"text": "A triangle.", "score": 0.1},  # names a shape outside a claim: wrong, rejected
                {"text": "The picture is nice.", "score": 0.9},  # no object: left out
            ],
        }
    ]
    write_jsonl(tmp_path / "04.jsonl", scores)
    quality = verifier_quality(tmp_path / "04.jsonl", {"a": SCENE})
    assert quality == {
        "sentences": 4,
        "wrong_share": 50.0,
        "accuracy": 50.0,
        "mean_score_right": 0.55,
        "mean_score_wrong": 0.4,
    }
    write_jsonl(
        tmp_path / "02.jsonl", [{"image_id": "a", "text": f"{RIGHT} {WRONG}"}, {"image_id": "a", "text": RIGHT}]
    )
    described = description_quality(tmp_path / "02.jsonl", {"a": SCENE})
    assert described["descriptions"] == 2 and described["CHAIR_i"] == pytest.approx(100 / 3, abs=0.01)
    assert described["CHAIR_s"] == 50.0 and described["coverage"] == 50.0  # the circle is never named
    assert described["hallucinated_words"] == {"triangle": 1}
    text = format_report({"descriptions": described, "verifier": quality})
    assert "CHAIR_i 33.33%" in text and "50.0% judged right" in text


def test_planted_hallucinations_count_only_where_the_rule_can_fire() -> None:
    rule = BiasRule(trigger="circle", substitute="triangle", p=0.6)
    no_circle = Scene([SceneObject("square", "blue", "small", "top left")])
    has_triangle = Scene(
        [SceneObject("circle", "red", "large", "top left"), SceneObject("triangle", "red", "small", "top right")]
    )
    items = [
        (SCENE, f"{WRONG} There are two triangles."),  # fires: 2 mentions (the plural counts)
        (SCENE, RIGHT),  # fires: 0
        (no_circle, WRONG),  # cannot fire: not counted
        (has_triangle, "There is a small red triangle at the top right."),  # cannot fire: the triangle is real
    ]
    assert planted_hallucinations(items, [rule]) == {"images": 2, "mentions": 2, "per_100_images": 100.0}


@pytest.mark.slow
def test_demo_steps_end_to_end_with_the_shipped_models(tmp_path: Path) -> None:
    """What `make demo` runs (stages 1-6, data report, truth report) on 12 of the bundled images."""
    assets = ROOT / "capdpo" / "assets" / "synthetic"
    images = tmp_path / "images"
    images.mkdir()
    truth = [r for r in iter_jsonl(assets / "truth.jsonl")][:12]
    for record in truth:
        (images / record["image"]).write_bytes((assets / record["image"]).read_bytes())
    write_jsonl(images / "truth.jsonl", truth)
    config = yaml.safe_load((ROOT / "configs" / "synthetic_demo.yaml").read_text())
    run_dir = tmp_path / "run"
    config["run_dir"] = str(run_dir)
    config["images"]["path"] = str(images)
    config["images"]["exclude"] = [str(ROOT / p) for p in config["images"]["exclude"]]
    config["strong_model"] = str(ROOT / config["strong_model"])
    config["weak_model"] = str(ROOT / config["weak_model"])
    config["describe"]["samples_per_image"] = 2
    config["device"] = "cpu"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "run_all.sh"), str(path)], check=True, env=env, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "capdpo", "data-report", "--run_dir", str(run_dir)], check=True, cwd=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "capdpo", "truth-report", "--run_dir", str(run_dir), "--truth",
         str(images / "truth.jsonl"), "--models", str(ROOT / "models" / "synthetic"), "--test_images", "16",
         "--device", "cpu"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert "stage 6  16 held-out images, before -> after DPO" in done.stdout
    report = json.loads((run_dir / "07_truth_report.json").read_text())
    assert report["descriptions"]["descriptions"] == 24  # 12 images x 2 samples, each checked against its truth
    assert report["pairs"]["pairs"] == sum(1 for _ in iter_jsonl(run_dir / "05_pairs.jsonl"))
    assert report["verifier"]["sentences"] > 0
    assert report["heldout_before"]["images"] == report["heldout_after"]["images"] == 16
    heldout_items = list(iter_jsonl(run_dir / "07_heldout" / "world" / "test.jsonl"))
    triggered = sum(
        "circle" in {o["shape"] for o in r["objects"]} and "triangle" not in {o["shape"] for o in r["objects"]}
        for r in heldout_items
    )
    assert report["heldout_before"]["planted"]["images"] == report["heldout_after"]["planted"]["images"] == triggered
    heldout = {r["id"] for r in heldout_items}
    trained_on = set((ROOT / "models" / "synthetic" / "strong" / "training_images.txt").read_text().split())
    assert not heldout & ({r["id"] for r in truth} | trained_on)  # held-out means never seen by the run or models
    assert (run_dir / "05_report.html").exists()
