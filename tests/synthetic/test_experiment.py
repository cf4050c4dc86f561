"""The experiment's bookkeeping: the issue's targets, the summary over seeds, pair accuracy against the ground truth
and the shuffled-pairs control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdpo.errors import ConfigError
from capdpo.synthetic.experiment import (
    SCALES,
    meets_targets,
    pair_accuracy,
    scale_with,
    shuffle_pairs,
    summarise,
)
from capdpo.synthetic.world import Scene, SceneObject


def test_targets_and_summary_by_hand() -> None:
    before = {"CHAIR_i": 20.0, "coverage": 80.0}
    assert meets_targets(before, {"CHAIR_i": 14.0, "coverage": 75.0})  # -30% exactly, -5 points exactly
    assert not meets_targets(before, {"CHAIR_i": 14.1, "coverage": 80.0})
    assert not meets_targets(before, {"CHAIR_i": 2.0, "coverage": 74.9})
    assert not meets_targets({"CHAIR_i": 0.0, "coverage": 80.0}, {"CHAIR_i": 0.0, "coverage": 80.0})
    row = {"CHAIR_i": 10.0, "CHAIR_s": 1.0, "coverage": 80.0, "sentence_accuracy": 1.0, "object_recall": 1.0}
    row["yes_no_accuracy"] = 50.0
    seeds = [
        {
            "before": {**row, "CHAIR_i": 20.0},
            "configs": {"main": {**row, "pair_accuracy": {"chosen_better": 90.0, "pairs": 10}}},
        },
        {
            "before": {**row, "CHAIR_i": 10.0},
            "configs": {"main": {**row, "pair_accuracy": {"chosen_better": 70.0, "pairs": 20}}},
        },
    ]
    summary = summarise(seeds)
    assert summary["before"]["CHAIR_i"] == pytest.approx((15.0, 7.0710678), rel=1e-6)
    assert summary["main"]["relative_CHAIR_i_drop"] == pytest.approx((25.0, 35.3553390), rel=1e-6)  # 50% and 0%
    assert summary["main"]["pair_chosen_better"][0] == 80.0
    assert summary["main"]["targets_every_seed"] is False  # the second seed did not drop


def test_pair_accuracy_and_shuffling(tmp_path: Path) -> None:
    scene = Scene([SceneObject("square", "blue", "small", "bottom right")])
    right = "There is a small blue square at the bottom right."
    wrong = "There is a small blue triangle at the bottom right."
    pairs = [
        {"image_id": "a", "chosen": right, "rejected": wrong, "score_chosen": 0.9, "score_rejected": 0.1},
        {"image_id": "a", "chosen": wrong, "rejected": right, "score_chosen": 0.8, "score_rejected": 0.2},
        {"image_id": "a", "chosen": right, "rejected": right + " ", "score_chosen": 0.6, "score_rejected": 0.5},
    ] * 20
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**p, "id": str(i)}) + "\n" for i, p in enumerate(pairs)))
    quality = pair_accuracy(path, {"a": scene})
    assert quality == {"pairs": 60, "chosen_better": 33.3, "chosen_worse": 33.3, "ties": 33.3}
    swapped = shuffle_pairs(path, tmp_path / "shuffled.jsonl", seed=0)
    assert 15 <= swapped <= 45
    records = [json.loads(line) for line in (tmp_path / "shuffled.jsonl").read_text().splitlines()]
    originals = {p["id"]: p for p in (json.loads(line) for line in path.read_text().splitlines())}
    flipped = [
        r
        for r in records
        if r["chosen"] != originals[r["id"]]["chosen"] or r["score_chosen"] != originals[r["id"]]["score_chosen"]
    ]
    assert len(flipped) == swapped
    assert all(r["score_chosen"] == originals[r["id"]]["score_rejected"] for r in flipped)


def test_scale_with_converts_values_and_rejects_bad_changes() -> None:
    base = SCALES["full"]
    changed = scale_with(base, ["samples_per_image=3", "dpo_epochs=5", "dpo_learning_rate=1e-4"])
    assert (changed.samples_per_image, changed.dpo_epochs, changed.dpo_learning_rate) == (3, 5.0, 1e-4)
    assert isinstance(changed.samples_per_image, int) and isinstance(changed.dpo_epochs, float)
    assert changed.pairs_images == base.pairs_images and base.samples_per_image != 3
    with pytest.raises(ConfigError, match="--set samples=8: expected FIELD=VALUE"):
        scale_with(base, ["samples=8"])
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        scale_with(base, ["k"])
    with pytest.raises(ConfigError, match="'eight' is not a valid int"):
        scale_with(base, ["k=eight"])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("main", {"pairs": {"min_chosen_score": SCALES["ci"].min_chosen_score}, "train": {"loss_type": None}}),
        ("rpo", {"train": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}}),
        (
            "unfiltered_rpo",
            {
                "pairs": {"min_chosen_score": 0.0},
                "train": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
            },
        ),
        ("sentence", {"pairs": {"mode": "sentence"}}),
        ("pairwise", {"validate": {"methods": ["pairwise"]}}),
    ],
)
def test_run_yaml_applies_each_configuration(tmp_path: Path, config: str, expected: dict) -> None:
    """Each configuration's run YAML differs from main only where the configuration says, and loads as a run
    config (the same validation as the stages)."""
    import yaml

    from capdpo.sections import load_config
    from capdpo.synthetic.experiment import Settings, run_yaml

    models = Path(__file__).resolve().parents[2] / "models" / "synthetic"
    settings = Settings(out=tmp_path, models=models, seeds=[0], scale=SCALES["ci"], scale_name="ci")
    run_dir = tmp_path / config
    run_dir.mkdir()
    path = run_yaml(run_dir, settings, 0, config, tmp_path / "world")
    data = yaml.safe_load(path.read_text())
    for section, values in expected.items():
        for key, value in values.items():
            assert data[section].get(key) == value, (section, key)
    load_config("train", ["--config", str(path)])  # every section is valid
