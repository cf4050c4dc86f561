"""One DPO round on the shipped synthetic models must remove the hallucination the strong model was trained into,
and a pipeline whose preferences carry no signal (chosen/rejected shuffled) must not.

The strong model names a shape next to a circle "triangle" 60% of the time in training; on fresh images where that
can happen (a circle, no triangle) it still does (the `planted` count). For each of two seeds, stages 1-6 run on 96 fresh images with the
weak verifier's yes/no scores, then the adapter describes 200 held-out images. CHAIR_i over all shapes is reported
in results.md but not asserted here: at this scale it moves within the seed-to-seed noise (README, synthetic world).
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models" / "synthetic"


def test_one_round_removes_the_planted_hallucination_and_shuffled_pairs_do_not(tmp_path: Path) -> None:
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

    def total(config: str) -> dict[str, int]:
        rows = [s["before"] if config == "before" else s["configs"][config] for s in result["seeds"]]
        return {k: sum(r["planted"][k] for r in rows) for k in ("images", "mentions")}

    before, learned, control = total("before"), total("unfiltered"), total("unfiltered_shuffled")
    report = json.dumps({"before": before, "unfiltered": learned, "shuffled": control})
    assert before["images"] >= 100 and before["mentions"] >= 20, report  # the bias shows before training
    for seed in result["seeds"]:
        trained, shuffled = seed["configs"]["unfiltered"], seed["configs"]["unfiltered_shuffled"]
        assert trained["trained"] and shuffled["trained"]
        # the verifier's pairs point the right way; shuffled ones are right about as often as wrong
        assert trained["pair_accuracy"]["chosen_better"] >= 55.0, trained["pair_accuracy"]
        assert shuffled["pair_accuracy"]["chosen_better"] <= 45.0, shuffled["pair_accuracy"]
    # one round removes at least 30% of the planted mentions (measured over seeds 0 and 1: 35 -> 16); the shuffled
    # control keeps clearly more of them (measured: 36)
    assert learned["mentions"] <= 0.7 * before["mentions"], report
    assert learned["mentions"] <= 0.6 * control["mentions"], report
    assert (tmp_path / "results.md").read_text().count("unfiltered") >= 2
