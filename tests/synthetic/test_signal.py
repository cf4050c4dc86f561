"""One DPO round on the shipped synthetic models must lower hallucination, and a pipeline whose preferences carry
no signal (chosen/rejected shuffled) must not.

The strong model names a shape next to a circle "triangle" 60% of the time in training; on fresh images where that
can happen (a circle, no triangle) it still does (the `planted` count). For each of two seeds, stages 1-6 run on 96
fresh images (4 descriptions each, pairs without the chosen-score filter, 10 epochs), then the adapter describes 200
held-out images. Measured with the three-cycle strong model (record ids include the model's path, so another
checkout samples differently): planted 93 -> 19 (shuffled 97); mean CHAIR_i
13.8 -> 6.7 (shuffled 14.6), coverage 83.7 -> 93.0. With 6 epochs planted fell only to 46, so the margin below
needs the 10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[2] / "models" / "synthetic"


@pytest.mark.slow(seconds=170)
def test_one_round_lowers_hallucination_and_shuffled_pairs_do_not(tmp_path: Path) -> None:
    from capdpo.synthetic.experiment import SCALES, Settings, run_experiment

    settings = Settings(
        out=tmp_path,
        models=MODELS,
        seeds=[0, 1],
        scale=SCALES["ci"],
        configs=["unfiltered", "unfiltered_shuffled"],
        device="cpu",
        scale_name="ci",
    )
    result = run_experiment(settings)

    def mean(key: str, config: str) -> float:
        rows = [s["before"] if config == "before" else s["configs"][config] for s in result["seeds"]]
        return sum(r[key] for r in rows) / len(rows)

    def total(config: str) -> dict[str, int]:
        rows = [s["before"] if config == "before" else s["configs"][config] for s in result["seeds"]]
        return {k: sum(r["planted"][k] for r in rows) for k in ("images", "mentions")}

    before, learned, control = total("before"), total("unfiltered"), total("unfiltered_shuffled")
    report = json.dumps({"before": before, "unfiltered": learned, "shuffled": control})
    assert before["images"] >= 100 and before["mentions"] >= 30, report  # the bias shows before training
    for seed in result["seeds"]:
        trained, shuffled = seed["configs"]["unfiltered"], seed["configs"]["unfiltered_shuffled"]
        assert trained["trained"] and shuffled["trained"]
        # the verifier's pairs point the right way; shuffled ones are right about as often as wrong
        assert trained["pair_accuracy"]["chosen_better"] >= 70.0, trained["pair_accuracy"]
        assert shuffled["pair_accuracy"]["chosen_better"] <= 55.0, shuffled["pair_accuracy"]
    # the planted hallucination mostly goes, and only with the verifier's preferences
    assert learned["mentions"] <= 0.4 * before["mentions"], report
    assert learned["mentions"] <= 0.4 * control["mentions"], report
    # hallucination as a whole falls (CHAIR_i over every shape) without losing coverage; shuffled pairs do not
    chair = {c: mean("CHAIR_i", c) for c in ("before", "unfiltered", "unfiltered_shuffled")}
    coverage = {c: mean("coverage", c) for c in ("before", "unfiltered")}
    assert chair["unfiltered"] <= 0.85 * chair["before"], chair
    assert chair["unfiltered"] <= 0.85 * chair["unfiltered_shuffled"], chair
    assert coverage["unfiltered"] >= coverage["before"] - 5.0, coverage
    assert (tmp_path / "results.md").read_text().count("unfiltered") >= 2
