"""POPE: the published answer rule, every figure against a hand computation, the full question files, answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capdpo.errors import CapdpoError, InputError
from capdpo.evaluation.answers import main as answers_main
from capdpo.evaluation.pope import PopeArgs, evaluate, read_questions, says_no

ROOT = Path(__file__).resolve().parents[2]
POPE = ROOT / "../shared/data/pope"


@pytest.mark.parametrize(
    "text, no",
    [
        ("Yes, there is a dog.", False),
        ("No.", True),
        ("There is no dog in the image.", True),
        ("Yes. But not a big one.", False),  # only the first sentence counts
        ("Not really", False),  # "Not" is not one of the words
        ("no, there isn't", True),  # commas are removed before the split
        ("I do not know", True),
        ("yes\nno", False),  # split on single spaces only: "yes\nno" is one word
        ("Nope", False),
        ("", False),
    ],
)
def test_the_published_answer_rule(text: str, no: bool) -> None:
    assert says_no(text) is no


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    """Two splits (6 and 4 questions) and answers with the tricky forms, in shuffled order."""
    folder = tmp_path / "pope"
    folder.mkdir()
    random_split = [("yes", "Yes, there is a dog."), ("no", "No."), ("yes", "There is no dog in the image."),
                    ("no", "Yes. But not a big one."), ("no", "Not really"), ("no", "no, there isn't")]  # fmt: skip
    popular = [("yes", "I do not know"), ("yes", "yes\nno"), ("no", "Nope"), ("yes", "Yes")]
    answers = []
    for split, rows in (("random", random_split), ("popular", popular)):
        questions = [
            {
                "question_id": i,
                "image": f"COCO_val2014_{i:012d}.jpg",
                "text": "Is there a dog in the image?",
                "label": lab,
            }
            for i, (lab, _) in enumerate(rows, start=1)
        ]
        write_lines(folder / f"coco_pope_{split}.json", questions)
        answers += [{"question_id": i, "split": split, "text": t} for i, (_, t) in enumerate(rows, start=1)]
    answers.reverse()
    return {"questions": folder, "answers": write_lines(tmp_path / "answers.jsonl", answers), "tmp": tmp_path}


def test_every_figure_equals_the_hand_computation(small: dict[str, Path]) -> None:
    out = small["tmp"] / "pope.json"
    metrics = evaluate(PopeArgs(str(small["answers"]), [str(small["questions"])], str(out), ""), log=lambda m: None)
    assert json.loads(out.read_text())["splits"] == metrics["splits"]
    r, p = metrics["splits"]["random"], metrics["splits"]["popular"]
    # random: TP 1 (q1), TN 2 (q2, q6), FN 1 (q3), FP 2 (q4, q5)
    assert (r["TP"], r["FP"], r["TN"], r["FN"], r["n"]) == (1, 2, 2, 1, 6)
    assert r["accuracy"] == pytest.approx(0.5) and r["precision"] == pytest.approx(1 / 3)
    assert r["recall"] == pytest.approx(0.5) and r["f1"] == pytest.approx(0.4) and r["yes_ratio"] == pytest.approx(0.5)
    # popular: FN 1 (q1), TP 2 (q2, q4), FP 1 (q3)
    assert (p["TP"], p["FP"], p["TN"], p["FN"]) == (2, 1, 0, 1)
    assert p["accuracy"] == pytest.approx(0.5) and p["precision"] == pytest.approx(2 / 3)
    assert p["recall"] == pytest.approx(2 / 3) and p["f1"] == pytest.approx(2 / 3) and p["yes_ratio"] == 0.75
    mean = metrics["mean"]
    assert mean["f1"] == pytest.approx((0.4 + 2 / 3) / 2) and mean["recall"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean["precision"] == pytest.approx(0.5) and mean["yes_ratio"] == pytest.approx(0.625)
    pooled = metrics["all"]
    assert (pooled["TP"], pooled["FP"], pooled["TN"], pooled["FN"], pooled["n"]) == (3, 3, 2, 2, 10)
    assert pooled["f1"] == pytest.approx(2 * 0.5 * 0.6 / 1.1) and pooled["yes_ratio"] == pytest.approx(0.6)


def test_zero_denominators_are_null_and_published_answer_files_score_one_split(tmp_path: Path) -> None:
    questions = write_lines(tmp_path / "coco_pope_adversarial.json",
                            [{"question_id": i, "image": "a.jpg", "text": "?", "label": "yes"} for i in (1, 2)])  # fmt: skip
    # POPE's own answer format: {"question_id", "answer"}, no split, no trailing newline
    answers = tmp_path / "answers.json"
    answers.write_text('{"question_id": 1, "answer": "No"}\r\n{"question_id": 2, "answer": "not at all"}')
    metrics = evaluate(PopeArgs(str(answers), [str(questions)]), log=lambda m: None)
    split = metrics["splits"]["adversarial"]
    assert (split["TP"], split["FN"], split["accuracy"], split["recall"]) == (0, 2, 0.0, 0.0)
    assert split["precision"] is None and split["f1"] is None and metrics["mean"]["f1"] is None
    assert split["yes_ratio"] == 0.0


def test_bad_answer_files_name_the_problem(small: dict[str, Path]) -> None:
    tmp = small["tmp"]
    cases = {
        "missing": ([{"question_id": 1, "split": "random", "text": "Yes"}], "10 POPE questions have no answer"),
        "twice": ([{"question_id": 1, "split": "random", "text": "Yes"}] * 2, ":2: question 1 of split random"),
        "unknown": ([{"question_id": 99, "split": "random", "text": "Yes"}], "question 99 is not in split random"),
        "nosplit": ([{"question_id": 1, "text": "Yes"}], ":1: the answer has no 'split'"),
        "notext": ([{"question_id": 1, "split": "random", "text": 3}], ":1: an answer needs 'question_id' and 'text'"),
    }
    for name, (rows, message) in cases.items():
        path = write_lines(tmp / f"{name}.jsonl", rows)
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            evaluate(PopeArgs(str(path), [str(small["questions"])]), log=lambda m: None)
    bad = write_lines(
        tmp / "coco_pope_bad.json", [{"question_id": 1, "image": "a.jpg", "text": "?", "label": "maybe"}]
    )
    with pytest.raises(InputError, match=r"coco_pope_bad.json:1: 'label'"):
        read_questions([str(bad)])


def test_the_published_question_files(tmp_path: Path) -> None:
    """All 9,000 questions of the three COCO splits; answering with the labels scores 100% with their yes share."""
    questions = read_questions([str(POPE)])
    assert sorted({q.split for q in questions}) == ["adversarial", "popular", "random"] and len(questions) == 9000
    answers = write_lines(
        tmp_path / "answers.jsonl",
        [{"question_id": q.question_id, "split": q.split, "text": "Yes." if q.label else "No, there is not."}
         for q in questions],
    )  # fmt: skip
    metrics = evaluate(PopeArgs(str(answers), [str(POPE)]), log=lambda m: None)
    for split in ("random", "popular", "adversarial"):
        labels = [json.loads(line)["label"] for line in (POPE / f"coco_pope_{split}.json").read_text().splitlines()]
        figures = metrics["splits"][split]
        assert figures["accuracy"] == figures["f1"] == 1.0
        assert figures["yes_ratio"] == labels.count("yes") / len(labels)
    assert metrics["all"]["n"] == 9000 and metrics["mean"]["accuracy"] == 1.0


def test_answers_end_to_end(small: dict[str, Path], sample_images: list[Path], tiny_models: dict[str, Path]) -> None:
    images = small["tmp"] / "images"
    images.mkdir()
    for i in range(1, 7):
        shutil.copy(sample_images[i % len(sample_images)], images / f"COCO_val2014_{i:012d}.jpg")
    out = small["tmp"] / "answers" / "pope.jsonl"
    args = ["--benchmark", "pope", "--model", str(tiny_models["strong"]), "--data", str(small["questions"]),
            "--images", str(images), "--out", str(out), "--yes_no_max_new_tokens", "3", "--device", "cpu",
            "--query_suffix", " Answer yes or no."]  # fmt: skip
    answers_main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["split"], r["question_id"]) for r in rows] == [("popular", i) for i in range(1, 5)] + [
        ("random", i) for i in range(1, 7)
    ]
    assert all(
        r["prompt"] == "Is there a dog in the image? Answer yes or no." and r["answer"] == r["text"] for r in rows
    )
    meta = json.loads(out.with_name("pope.meta.json").read_text())
    assert meta["stats"]["yes"] + meta["stats"]["no"] == 10
    metrics = evaluate(PopeArgs(str(out), [str(small["questions"])]), log=lambda m: None)
    assert metrics["all"]["n"] == 10
    assert metrics["all"]["yes_ratio"] == pytest.approx(sum(not says_no(r["text"]) for r in rows) / 10)


def test_cli_reports_a_missing_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from capdpo.evaluation.pope import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--answers", str(tmp_path / "none.jsonl"), "--questions", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert issubclass(InputError, CapdpoError)
