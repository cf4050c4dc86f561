"""POPE (Polling-based Object Probing Evaluation): yes/no questions "Is there a <object> in the image?" over COCO
val2014 images, in three splits (random, popular, adversarial), scored like POPE's own `evaluate.py`.

    python eval/answers.py --benchmark pope --model ... --data DATA/POPE/output/coco --images DATA/coco/val2014 \
        --out runs/demo/eval/base/answers/pope.jsonl
    python eval/pope.py --answers runs/demo/eval/base/answers/pope.jsonl --questions DATA/POPE/output/coco \
        --out runs/demo/eval/base/pope.json

The published rule reads an answer as "no" when its first sentence (the text before the first '.', when there is
one), with commas removed and split on single spaces, holds the word "No", "not" or "no"; anything else is "yes".
Per split: TP, FP, TN, FN with "yes" as the positive class, accuracy, precision, recall, F1 and the share of "yes"
answers, as fractions (papers print them ×100). `mean` averages each figure over the splits (what papers report as
the POPE average); `all` pools every answer. A figure whose denominator is zero is null where the published script
would stop with a division error.

Answers are matched to questions by (split, question_id), not by line order, so an answer file in any order scores
the same; every question must have exactly one answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options
from capdpo.errors import InputError
from capdpo.evaluation.benchmarks import Query, model_label, need
from capdpo.jsonl import foreign_jsonl, write_json, write_jsonl

FIGURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_SPLIT = re.compile(r"_pope_([A-Za-z0-9]+)$")


# ---- the published rule -----------------------------------------------------------------------------------
def says_no(text: str) -> bool:
    """POPE's reading of an answer: "no" when its first sentence holds the word No / not / no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def confusion_metrics(predictions: list[bool], labels: list[bool]) -> dict[str, Any]:
    """Counts and figures for yes (True) predictions against yes (True) labels, as POPE's evaluate.py computes them."""
    tp = sum(p and t for p, t in zip(predictions, labels, strict=True))
    fp = sum(p and not t for p, t in zip(predictions, labels, strict=True))
    tn = sum(not p and not t for p, t in zip(predictions, labels, strict=True))
    fn = sum(not p and t for p, t in zip(predictions, labels, strict=True))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None:
        f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _ratio(sum(predictions), len(predictions)),
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "n": len(predictions),
    }


# ---- question and answer files ----------------------------------------------------------------------------
@dataclass
class PopeQuestion:
    split: str
    question_id: Any
    image: str
    text: str
    label: bool  # True: the object is in the image ("yes")


def split_name(path: Path) -> str:
    """`coco_pope_random.json` -> random (any `<dataset>_pope_<split>`); otherwise the file's stem."""
    match = _SPLIT.search(path.stem)
    return match.group(1) if match else path.stem


def question_files(paths: list[str]) -> list[Path]:
    """The question files given; a folder stands for its `*_pope_*.json` files (random, popular, adversarial)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("*_pope_*.json"))
            if not found:
                raise InputError(f"{path}: no *_pope_<split>.json question files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: POPE question file or folder not found")
    return files


def read_questions(paths: list[str]) -> list[PopeQuestion]:
    """Every question of the files (one JSON object a line: question_id, image, text, label yes/no)."""
    questions: list[PopeQuestion] = []
    splits: dict[str, Path] = {}
    for path in question_files(paths):
        split = split_name(path)
        if split in splits:
            raise InputError(f"{path}: split '{split}' is also given by {splits[split]}")
        splits[split] = path
        seen: set[Any] = set()
        for number, q in foreign_jsonl(path):
            where = f"{path}:{number}"
            if "question_id" not in q or not isinstance(q.get("image"), str) or not isinstance(q.get("text"), str):
                raise InputError(f"{where}: a POPE question needs 'question_id', 'image' and 'text'")
            if q.get("label") not in ("yes", "no"):
                raise InputError(f'{where}: \'label\' should be "yes" or "no", got {q.get("label")!r}')
            if q["question_id"] in seen:
                raise InputError(f"{where}: question_id {q['question_id']} appears twice")
            seen.add(q["question_id"])
            questions.append(PopeQuestion(split, q["question_id"], q["image"], q["text"], q["label"] == "yes"))
        if not seen:
            raise InputError(f"{path}: no questions")
    return questions


def read_answers(path: str | Path, splits: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """{(split, question_id): (answer text, where)}: capdpo's answer file, or POPE / LLaVA answer files with `answer`
    or `text` (those carry no split, so they are accepted only against one split)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: answer file not found")
    answers: dict[tuple[str, str], tuple[str, str]] = {}
    for number, a in foreign_jsonl(path):
        where = f"{path}:{number}"
        text = a.get("text", a.get("answer"))
        if "question_id" not in a or not isinstance(text, str):
            raise InputError(f"{where}: an answer needs 'question_id' and 'text' (or 'answer') as a string")
        split = a.get("split")
        if split is None:
            if len(splits) != 1:
                raise InputError(f"{where}: the answer has no 'split'; score one question file at a time")
            split = splits[0]
        key = (str(split), str(a["question_id"]))
        if key in answers:
            raise InputError(f"{where}: question {key[1]} of split {key[0]} is answered twice")
        answers[key] = (text, where)
    return answers


def pope_metrics(questions: list[PopeQuestion], answers: dict[tuple[str, str], tuple[str, str]]) -> dict[str, Any]:
    """Per-split figures, their mean over splits, and the pooled figures; every question needs its answer."""
    splits = list(dict.fromkeys(q.split for q in questions))
    known = {(q.split, str(q.question_id)) for q in questions}
    extra = next((key for key in answers if key not in known), None)
    if extra is not None:
        raise InputError(f"{answers[extra][1]}: question {extra[1]} is not in split {extra[0]}'s question file")
    missing = [q for q in questions if (q.split, str(q.question_id)) not in answers]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(questions)} POPE questions have no answer (first: split {missing[0].split}, "
            f"question_id {missing[0].question_id})"
        )
    metrics: dict[str, Any] = {"benchmark": "pope", "splits": {}}
    all_predictions: list[bool] = []
    all_labels: list[bool] = []
    for split in splits:
        group = [q for q in questions if q.split == split]
        predictions = [not says_no(answers[(split, str(q.question_id))][0]) for q in group]
        labels = [q.label for q in group]
        metrics["splits"][split] = confusion_metrics(predictions, labels)
        all_predictions += predictions
        all_labels += labels
    per_split = list(metrics["splits"].values())
    metrics["mean"] = {
        name: (
            sum(s[name] for s in per_split) / len(per_split) if all(s[name] is not None for s in per_split) else None
        )
        for name in FIGURES
    }
    metrics["all"] = confusion_metrics(all_predictions, all_labels)
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """Per split, mean and pooled figures ×100 with their counts."""
    header = f"{'split':<14}" + "".join(f"{name:>11}" for name in FIGURES) + f"{'TP':>7}{'FP':>7}{'TN':>7}{'FN':>7}"
    lines = [header]
    rows = [*metrics["splits"].items(), ("mean", metrics["mean"]), ("all", metrics["all"])]
    for name, row in rows:
        cells = "".join(f"{'-' if row[f] is None else f'{100 * row[f]:.2f}':>11}" for f in FIGURES)
        counts = "".join(f"{row[c]:>7}" for c in ("TP", "FP", "TN", "FN")) if "TP" in row else ""
        lines.append(f"{name:<14}{cells}{counts}")
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark pope) ----------------------------------------------------------
def pope_queries(sec: Any, seed: int = 0) -> tuple[list[Query], None]:
    """Every question of the split files (`--data`: a folder of `*_pope_<split>.json` or one such file)."""
    data, images = need(sec.data, "data", "pope"), need(sec.images, "images", "pope")
    queries = [
        Query(
            f"{q.split}:{q.question_id}", (q.split, q.question_id), images / q.image, q.text + sec.query_suffix, True
        )
        for q in read_questions([str(data)])
    ]
    return queries, None


def write_pope(sec: Any, queries: list[Query], answers: list[dict[str, Any]], context: Any) -> dict[str, Any]:
    """JSONL, one line a question: question_id, split, image, prompt, text (the answer; also as `answer`, the key
    POPE's own script reads), model_id."""
    label = model_label(sec.model, sec.adapter, sec.model_id)
    rows = [
        {
            "question_id": q.question_id[1],
            "split": q.question_id[0],
            "image": q.image.name,
            "prompt": q.prompt,
            "text": a["text"],
            "answer": a["text"],
            "model_id": label,
        }
        for q, a in zip(queries, answers, strict=True)
    ]
    write_jsonl(sec.out, rows)
    no = sum(says_no(a["text"]) for a in answers)
    return {"yes": len(answers) - no, "no": no}


# ---- command line -----------------------------------------------------------------------------------------
@dataclass
class PopeArgs:
    """Options of `python eval/pope.py`."""

    answers: str = field(
        metadata={
            "help": "Answers: JSONL of {question_id, split, text} (eval/answers.py), or POPE's {question_id, answer}."
        }
    )
    questions: list[str] = field(
        metadata={"help": "POPE question file(s) coco_pope_<split>.json, or a folder holding them (all splits)."}
    )
    out: str = field(default="", metadata={"help": "Write the figures to this JSON file."})
    details: str = field(default="", metadata={"help": "Also write one JSONL line per question: label, reading."})


def parse_args(argv: list[str] | None) -> PopeArgs:
    return parse_options(PopeArgs, argv, "POPE accuracy, precision, recall, F1 and yes-ratio, as POPE's evaluate.py.")


def evaluate(args: PopeArgs, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score an answer file; write `--out` / `--details`; return the figures."""
    questions = read_questions(args.questions)
    splits = list(dict.fromkeys(q.split for q in questions))
    answers = read_answers(args.answers, splits)
    metrics = pope_metrics(questions, answers)
    metrics["files"] = {"answers": str(args.answers), "questions": [str(p) for p in question_files(args.questions)]}
    if args.out:
        write_json(args.out, metrics)
    if args.details:
        rows = []
        for q in questions:
            text = answers[(q.split, str(q.question_id))][0]
            rows.append(
                {
                    "split": q.split,
                    "question_id": q.question_id,
                    "label": "yes" if q.label else "no",
                    "read_as": "no" if says_no(text) else "yes",
                    "text": text,
                }
            )
        write_jsonl(args.details, rows)
    (log or print)(f"POPE: {len(questions)} answers over {', '.join(splits)}\n\n{format_table(metrics)}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see eval/pope.py)."""
    from capdpo.cli import run_cli

    run_cli(lambda a: evaluate(parse_args(a)), argv)


if __name__ == "__main__":  # pragma: no cover
    main()
