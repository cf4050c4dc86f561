"""scripts/check_{amber,pope}_official.py: the parts that run without the official checkouts (which capdpo does not
ship): the responses they write, how they call the official scripts and read back their printed figures."""

from __future__ import annotations

import importlib.util

from tests.helpers import ROOT


def _check():
    spec = importlib.util.spec_from_file_location("check_amber_official", ROOT / "scripts" / "check_amber_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# as the official script prints (print(name, value, "\n") leaves a space before the blank line)
PRINTED = (
    "Generative Task:\nCHAIR:\t\t 11.2\nCover:\t\t 30.6\nHal:\t\t 19.7\nCog:\t\t 31.0 \n\n"
    "Descriminative Task:\nAccuracy:\t 40.0\nPrecision:\t 67.4\nRecall:\t\t 39.9\nF1:\t\t 50.1 \n\n"
    "Exsitence:\nAccuracy:\t 39.5\nF1:\t\t 56.6 \n\n"
    "State:\nRecall:\t\t 40.1\nRelation:\nF1:\t\t 40.2\n"
)


def test_the_official_printout_is_read_into_capdpos_json_paths() -> None:
    figures = _check().official_figures(PRINTED)
    assert figures[()] == {"CHAIR": 11.2, "Cover": 30.6, "Hal": 19.7, "Cog": 31.0, "Accuracy": 40.0,
                           "Precision": 67.4, "Recall": 39.9, "F1": 50.1}  # fmt: skip
    assert figures[("existence",)] == {"Accuracy": 39.5, "F1": 56.6}
    assert figures[("attribute", "state")] == {"Recall": 40.1}
    assert figures[("relation",)] == {"F1": 40.2}


def test_one_seeded_response_per_query() -> None:
    check = _check()
    annotations = [
        {"type": "generative", "truth": ["dog", "ball"], "hallu": ["cat"]},
        {"type": "discriminative-hallucination", "truth": "no"},
        {"type": "generative", "truth": ["tree"], "hallu": ["car", "bus"]},
    ] + [{"type": "discriminative-attribute-state", "truth": "yes"}] * 200
    association = {"dog": ["cat", "leash"], "tree": ["bush"]}
    first = check.responses(annotations, association, seed=3)
    assert [r["id"] for r in first] == list(range(1, len(annotations) + 1))
    assert first == check.responses(annotations, association, seed=3)
    assert first != check.responses(annotations, association, seed=4)
    answers = [r["response"] for r in first[3:]]
    exact = sum(a in ("Yes", "No") for a in answers)
    assert 0.7 * len(answers) < exact < len(answers)  # mostly exact answers, some other forms


def _pope_check():
    spec = importlib.util.spec_from_file_location("check_pope_official", ROOT / "scripts" / "check_pope_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pope_check_fills_in_the_official_scripts_two_paths_and_reads_its_printout(tmp_path) -> None:
    """A stand-in for POPE's evaluate.py of the same shape: the paths reach it, and its printout is read back."""
    answers, labels = tmp_path / "answers.jsonl", tmp_path / "labels.json"
    answers.write_text("a\nb\nc\n")
    labels.write_text("x\n")
    source = (
        "ans_file = ''\nlabel_file = ''\n"
        "n = len(open(ans_file).read().splitlines()); m = len(open(label_file).read().splitlines())\n"
        "print('TP\\tFP\\tTN\\tFN\\t')\nprint('{}\\t{}\\t{}\\t{}'.format(n, m, 0, 1))\n"
        "print('Accuracy: {}'.format(0.5))\nprint('F1 score: {}'.format(1 / 3))\nprint('Yes ratio: {}'.format(0.25))\n"
    )
    figures = _pope_check().run_official(source, answers, labels)
    assert figures == {"TP": 3, "FP": 1, "TN": 0, "FN": 1, "accuracy": 0.5, "f1": 1 / 3, "yes_ratio": 0.25}
