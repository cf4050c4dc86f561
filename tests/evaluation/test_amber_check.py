"""scripts/check_amber_official.py: the parts that run without the official AMBER checkout (which capdpo does not
ship): the responses it writes and how it reads the official script's printed figures."""

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
