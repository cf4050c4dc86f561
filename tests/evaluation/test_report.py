"""The before/after report: table values and deltas, run folders and single files, PNG charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.report import load_run, main, parse_runs

DATA = Path(__file__).parent / "data"
BASE, TRAINED = DATA / "report_base", DATA / "report_trained"


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(benchmark, metric) -> cells of the markdown table."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| Benchmark"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_report_from_two_run_folders(tmp_path: Path) -> None:
    out = tmp_path / "report"
    main(["--runs", f"base={BASE}", f"trained={TRAINED}", "--out", str(out)])
    markdown = (out / "report.md").read_text()
    rows = table_rows(markdown)
    # direction, baseline, trained (delta, verdict)
    assert rows[("MMHal-Bench", "Score (0-6)")] == ["↑", "2.91", "3.37 (+0.46 ✓)"]
    assert rows[("MMHal-Bench", "Hallucination rate")] == ["↓", "0.52", "0.41 (-0.11 ✓)"]
    assert rows[("AMBER", "CHAIR")] == ["↓", "7.8", "5.1 (-2.7 ✓)"]
    assert rows[("AMBER", "Cover")] == ["↑", "51.0", "49.5 (-1.5 ✗)"]
    assert rows[("AMBER", "Hal")] == ["↓", "36.4", "25.0 (-11.4 ✓)"]
    assert rows[("AMBER", "Cog")] == ["↓", "4.2", "2.0 (-2.2 ✓)"]
    assert rows[("AMBER", "F1")] == ["↑", "74.2", "75.2 (+1.0 ✓)"]
    assert rows[("AMBER", "AMBER score")] == ["↑", "83.2", "85.1 (+1.9 ✓)"]
    assert rows[("LLaVA-Bench (In-the-Wild)", "Overall")] == ["↑", "81.0", "84.5 (+3.5 ✓)"]
    assert rows[("LLaVA-Bench (In-the-Wild)", "Detail")] == ["↑", "71.3", "71.3 (±0)"]
    assert rows[("LLaVA-Bench (In-the-Wild)", "Complex reasoning")] == ["↑", "88.4", "87.0 (-1.4 ✗)"]
    assert rows[("CHAIR (COCO)", "CHAIR_s")] == ["↓", "48.0", "–"]  # the trained run has no chair.json
    assert rows[("CHAIR (COCO)", "Recall")] == ["↑", "77.5", "–"]
    assert rows[("CHAIR (COCO)", "BLEU-4")] == ["↑", "20.1", "–"]
    assert ("CHAIR (COCO)", "Critic (0-100)") not in rows  # no run has it: no row
    assert "trained: 1 of 96 MMHal-Bench judge replies were unparseable" in markdown

    report = json.loads((out / "report.json").read_text())
    hal = next(r for r in report["rows"] if r["metric"] == "Hal")
    assert hal["values"] == {"base": 36.4, "trained": 25.0} and hal["deltas"]["trained"] == pytest.approx(-11.4)

    for name in ("mmhal", "amber", "llava_bench", "chair"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 1000 and f"]({name}.png)" in markdown
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100


def test_single_metric_files_and_three_runs(tmp_path: Path) -> None:
    third = tmp_path / "dpo_mmhal.json"
    third.write_text(
        json.dumps({"benchmark": "mmhal", "avg_score": 2.5, "hallucination_rate": 0.6, "judge": {"model": "other"}})
    )
    out = tmp_path / "r"
    main(
        [
            "--runs",
            f"base={BASE / 'mmhal.json'}",
            f"trained={TRAINED / 'mmhal.json'}",
            f"worse={third}",
            "--out",
            str(out),
        ]
    )
    markdown = (out / "report.md").read_text()
    rows = table_rows(markdown)
    assert rows[("MMHal-Bench", "Score (0-6)")] == ["↑", "2.91", "3.37 (+0.46 ✓)", "2.50 (-0.41 ✗)"]
    assert rows[("MMHal-Bench", "Hallucination rate")] == ["↓", "0.52", "0.41 (-0.11 ✓)", "0.60 (+0.08 ✗)"]
    assert len(rows) == 2 and sorted(p.name for p in out.glob("*.png")) == ["mmhal.png"]
    assert "judged by different models" in markdown


def test_amber_halves_are_merged_and_scored(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "amber_g.json").write_text(json.dumps({"CHAIR": 6.0, "Cover": 50.0, "Hal": 30.0, "Cog": 3.0}))
    (run / "amber_d.json").write_text(json.dumps({"Accuracy": 70.0, "F1": 73.3}))
    amber = load_run(run)["amber"]
    assert amber["CHAIR"] == 6.0 and amber["F1"] == 73.3
    assert amber["AMBER"] == 83.7  # (100 - 6.0 + 73.3) / 2 = 83.65, half-up


def test_bad_runs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_runs([f"a={BASE}", f"a={TRAINED}"])
    assert parse_runs([str(BASE)]) == [("report_base", BASE)]
    with pytest.raises(InputError, match="no metrics files found"):
        load_run(tmp_path)
    odd = tmp_path / "numbers.json"
    odd.write_text(json.dumps({"x": 1}))
    with pytest.raises(InputError, match="cannot tell which benchmark"):
        load_run(odd)


def test_fractions_get_three_decimals(tmp_path: Path) -> None:
    for name, values in (("a", {"CHAIR_s": 0.48, "CHAIR_i": 0.139}), ("b", {"CHAIR_s": 0.412, "CHAIR_i": 0.1})):
        (tmp_path / f"{name}_chair.json").write_text(json.dumps(values))
    main(["--runs", f"a={tmp_path / 'a_chair.json'}", f"b={tmp_path / 'b_chair.json'}", "--out", str(tmp_path / "r")])
    rows = table_rows((tmp_path / "r" / "report.md").read_text())
    assert rows[("CHAIR (COCO)", "CHAIR_s")] == ["↓", "0.480", "0.412 (-0.068 ✓)"]
    assert rows[("CHAIR (COCO)", "CHAIR_i")] == ["↓", "0.139", "0.100 (-0.039 ✓)"]


def test_pope_and_object_halbench_rows(tmp_path: Path) -> None:
    runs = {}
    for name, f1, hall in (("base", 0.8512, 15.33), ("dpo", 0.8601, 9.67)):
        folder = tmp_path / name
        folder.mkdir()
        pope = {"benchmark": "pope", "mean": {"f1": f1, "accuracy": 0.86, "precision": 0.9, "recall": 0.8},
                "all": {"yes_ratio": 0.45}, "splits": {}}  # fmt: skip
        (folder / "pope.json").write_text(json.dumps(pope))
        objhal = {"benchmark": "objhal", "Response Hall": hall, "Object Hall": hall / 2, "Object Recall": 60.0}
        (folder / "objhal.json").write_text(json.dumps(objhal))
        runs[name] = folder
    out = tmp_path / "report"
    main(["--runs", *(f"{k}={v}" for k, v in runs.items()), "--out", str(out)])
    markdown = (out / "report.md").read_text()
    rows = table_rows(markdown)
    assert rows[("POPE (COCO)", "F1 (mean of splits)")] == ["↑", "0.851", "0.860 (+0.009 ✓)"]
    assert rows[("Object HalBench", "Response Hall")] == ["↓", "15.33", "9.67 (-5.66 ✓)"]
    assert rows[("Object HalBench", "Object Recall")] == ["↑", "60.00", "60.00 (±0)"]
    assert (out / "pope.png").is_file() and (out / "objhal.png").is_file()
