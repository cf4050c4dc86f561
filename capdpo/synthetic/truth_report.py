"""Check a run on synthetic images against their ground truth: every stage's output, then the trained adapter.

    python -m capdpo truth-report --run_dir runs/synthetic_demo [--truth capdpo/assets/synthetic/truth.jsonl]
        [--models models/synthetic --test_images 128]

Stage 2: how much the strong model hallucinates on the run's own images (CHAIR_i, CHAIR_s, coverage).
Stage 4: how well the verifier's scores separate right sentences from wrong ones (accuracy of score >= 0.5, mean
score of each). Stage 5: how many pairs have a chosen side with fewer wrong claims than the rejected side.
Stage 6 (with `--test_images N`): the strong model with and without the trained adapter, describing N held-out
images drawn fresh (never the run's images or the models' training images).

Writes `<run_dir>/07_truth_report.json` and prints a short table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options, run_cli
from capdpo.config import option
from capdpo.synthetic.world import Scene, WorldImage, read_split

TEST_WORLD_SEED = 90_210  # held-out images of the report: a seed no experiment or model build uses
REPORT_FILE = "07_truth_report.json"


def verifier_quality(scores_file: Path, scenes: dict[str, Scene]) -> dict[str, Any]:
    """How the stage 4 scores of candidate sentences match the truth (sentences naming no object are left out)."""
    from capdpo.jsonl import iter_jsonl
    from capdpo.synthetic.scoring import wrong_claims

    counts: Counter[str] = Counter()
    sums: Counter[str] = Counter()
    for record in iter_jsonl(scores_file):
        scene = scenes[record["image_id"]]
        for candidate in record["candidates"]:
            wrong, claims = wrong_claims(candidate["text"], scene)
            if not claims:
                continue
            kind = "wrong" if wrong else "right"
            counts[kind] += 1
            sums[kind] += float(candidate["score"])
            counts["agree"] += (float(candidate["score"]) >= 0.5) == (kind == "right")
    n = counts["right"] + counts["wrong"]
    return {
        "sentences": n,
        "wrong_share": round(100 * counts["wrong"] / n, 1) if n else 0.0,
        "accuracy": round(100 * counts["agree"] / n, 1) if n else 0.0,
        "mean_score_right": round(sums["right"] / counts["right"], 3) if counts["right"] else None,
        "mean_score_wrong": round(sums["wrong"] / counts["wrong"], 3) if counts["wrong"] else None,
    }


def description_quality(descriptions_file: Path, scenes: dict[str, Scene]) -> dict[str, Any]:
    """CHAIR and coverage of the stage 2 descriptions (`capdpo.synthetic.scoring`)."""
    from capdpo.jsonl import iter_jsonl
    from capdpo.synthetic.scoring import score_descriptions

    metrics = score_descriptions((scenes[r["image_id"]], r["text"]) for r in iter_jsonl(descriptions_file))
    keys = ("CHAIR_i", "CHAIR_s", "coverage", "sentence_accuracy", "hallucinated_words")
    return {"descriptions": metrics["counts"].get("descriptions", 0), **{k: metrics[k] for k in keys}}


def read_truth(path: Path) -> dict[str, Scene]:
    """Image id -> scene, from a `truth.jsonl` / split file; a clear error if it is missing."""
    from capdpo.errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: no ground-truth file (write_demo_images or generate_world writes one)")
    return {item.id: item.scene for item in read_split(path)}


def heldout_images(out: Path, n: int, models: Path, avoid: set[str]) -> list[WorldImage]:
    """`n` fresh test images, none of them among `avoid` or the models' training images."""
    from capdpo.synthetic.experiment import training_image_ids
    from capdpo.synthetic.world import generate_world

    return generate_world(out, {"test": n}, seed=TEST_WORLD_SEED, exclude=training_image_ids(models) | avoid)["test"]


def build_report(
    run_dir: Path, truth: Path, models: Path | None = None, test_images: int = 0, device: str = "auto"
) -> dict[str, Any]:
    """Everything the module docstring lists, for the stages whose files exist in `run_dir`."""
    from capdpo.jsonl import write_json
    from capdpo.pipeline import STAGES

    scenes = read_truth(truth)
    report: dict[str, Any] = {"run_dir": str(run_dir), "truth": str(truth)}
    files = {info.section: run_dir / info.output for info in STAGES if info.output.endswith(".jsonl")}
    if files["describe"].exists():
        report["descriptions"] = description_quality(files["describe"], scenes)
    if files["validate"].exists():
        report["verifier"] = verifier_quality(files["validate"], scenes)
    if files["pairs"].exists():
        from capdpo.synthetic.experiment import pair_accuracy

        report["pairs"] = pair_accuracy(files["pairs"], scenes)
    adapter = run_dir / "06_train" / "adapter"
    if test_images and models is not None and adapter.exists():
        from capdpo.synthetic.evaluate import EvalSettings, evaluate_model

        items = heldout_images(run_dir / "07_heldout" / "world", test_images, models, set(scenes))
        settings = EvalSettings(device=device, questions=False)
        strong = str(models / "strong")
        for name, path in (("before", None), ("after", str(adapter))):
            metrics = evaluate_model(strong, items, [], run_dir / "07_heldout" / name, path, settings)["generative"]
            keys = ("CHAIR_i", "CHAIR_s", "coverage", "sentence_accuracy", "hallucinated_words", "planted")
            report[f"heldout_{name}"] = {"images": len(items), **{k: metrics[k] for k in keys}}
    write_json(run_dir / REPORT_FILE, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    lines = []
    if "descriptions" in report:
        d = report["descriptions"]
        lines.append(
            f"stage 2  strong model on the run's {d['descriptions']} descriptions: CHAIR_i {d['CHAIR_i']}%, "
            f"CHAIR_s {d['CHAIR_s']}%, coverage {d['coverage']}%; hallucinated: {d['hallucinated_words'] or '-'}"
        )
    if "verifier" in report:
        v = report["verifier"]
        lines.append(
            f"stage 4  verifier on {v['sentences']} candidate sentences ({v['wrong_share']}% wrong): "
            f"{v['accuracy']}% judged right at 0.5; mean score right {v['mean_score_right']}, "
            f"wrong {v['mean_score_wrong']}"
        )
    if "pairs" in report:
        p = report["pairs"]
        lines.append(
            f"stage 5  {p['pairs']} pairs: chosen truly better {p['chosen_better']}%, worse {p['chosen_worse']}%, "
            f"ties {p['ties']}%"
        )
    if "heldout_before" in report:
        b, a = report["heldout_before"], report["heldout_after"]
        lines.append(
            f"stage 6  {b['images']} held-out images, before -> after DPO: CHAIR_i {b['CHAIR_i']}% -> {a['CHAIR_i']}%, "
            f"coverage {b['coverage']}% -> {a['coverage']}%, planted 'triangle' mentions in "
            f"{b['planted']['images']} images with a circle and no triangle {b['planted']['mentions']} -> "
            f"{a['planted']['mentions']}, hallucinated {b['hallucinated_words'] or '-'} -> "
            f"{a['hallucinated_words'] or '-'}"
        )
    return "\n".join(lines)


@dataclass
class TruthReportOptions:
    """`python -m capdpo truth-report`: check a synthetic-world run against the ground truth."""

    run_dir: str = option("A run directory of stages 1-6 on synthetic images.", "")
    truth: str = option("Ground truth of the run's images.", "capdpo/assets/synthetic/truth.jsonl")
    models: str = option("Folder with strong/ (for --test_images).", "models/synthetic")
    test_images: int = option("Held-out images for before/after (0: skip).", 128)
    device: str = option("'auto', 'cpu' or 'cuda'.", "auto")


def main(argv: list[str] | None = None) -> None:
    def _run(args: list[str] | None) -> None:
        opts = parse_options(TruthReportOptions, args, __doc__.split("\n\n")[0], required=("run_dir",))
        report = build_report(Path(opts.run_dir), Path(opts.truth), Path(opts.models), opts.test_images, opts.device)
        print(format_report(report))
        print(f"Written: {Path(opts.run_dir) / REPORT_FILE}")

    run_cli(_run, argv)
