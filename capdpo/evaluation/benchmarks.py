"""The benchmarks capdpo evaluates on, registered in `BENCHMARKS`: how each one's queries are read and answers
written (`eval/answers.py --benchmark NAME`), which script scores the answers, and which rows the before/after
report (`eval/report.py`) shows.

A benchmark's code lives in one module of this package (its queries, its answer file, its scorer); the entries
below name its functions as "module:function", resolved only when used, so this table stays free of heavy imports.
To add a benchmark: a module with `<name>_queries(sec, seed) -> (queries, context)` and
`write_<name>(sec, queries, answers, context) -> stats`, its scorer and `eval/<name>.py` wrapper, an entry here
(with its report rows), and a test in tests/evaluation/ that checks every figure against a hand computation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError


@dataclass
class Query:
    """One question to answer: its key in the work file, the benchmark's own id, image, prompt and token limit."""

    key: str
    question_id: Any
    image: Path
    prompt: str
    yes_no: bool = False  # a short yes/no question: answered with the short token limit


@dataclass(frozen=True)
class Row:
    """One metric of the report table: where it is read from and which direction is better."""

    label: str
    keys: tuple[tuple[str, ...], ...]  # alternative key paths into the benchmark's metrics, first found wins
    higher_is_better: bool
    digits: int | None = 1  # None: 3 decimals for fractions (all values within [-1, 1]), else 1


@dataclass(frozen=True)
class Report:
    """A benchmark's part of the before/after report."""

    name: str  # its key in report.json and its chart's file name
    title: str
    files: tuple[str, ...]  # its metrics files in an evaluation folder (the first found is used)
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark (see the module docstring)."""

    summary: str
    queries: str  # "module:function" (AnswersConfig, seed) -> (list[Query], context for the writer)
    write: str  # "module:function" (AnswersConfig, queries, answers, context) -> stats
    scorer: str  # the eval/ script that scores the answer file
    report: Report | None = None  # None: reported under another entry (amber_g / amber_d under amber)

    def load(self, what: str) -> Any:
        """The function named by `queries` or `write`."""
        module, name = getattr(self, what).split(":")
        return getattr(importlib.import_module(module), name)


_AMBER = "capdpo.evaluation.amber"
BENCHMARKS: dict[str, Benchmark] = {
    "mmhal": Benchmark(
        "MMHal-Bench: 96 questions, a judge rates each answer 0-6",
        "capdpo.evaluation.mmhal:mmhal_queries",
        "capdpo.evaluation.mmhal:write_mmhal",
        "eval/mmhal.py",
        Report(
            "mmhal",
            "MMHal-Bench",
            ("mmhal.json",),
            (
                Row("Score (0-6)", (("avg_score",),), True, 2),
                Row("Hallucination rate", (("hallucination_rate",),), False, 2),
            ),
        ),
    ),
    "amber": Benchmark(
        "AMBER, generative and discriminative queries",
        f"{_AMBER}:amber_queries",
        f"{_AMBER}:write_amber",
        "eval/amber.py",
        Report(
            "amber",
            "AMBER",
            ("amber.json", "amber_g.json", "amber_d.json"),
            (
                Row("CHAIR", (("CHAIR",),), False),
                Row("Cover", (("Cover",),), True),
                Row("Hal", (("Hal",),), False),
                Row("Cog", (("Cog",),), False),
                Row("Accuracy", (("Accuracy",),), True),
                Row("F1", (("F1",),), True),
                Row("AMBER score", (("AMBER",), ("AMBER_score",)), True),
            ),
        ),
    ),
    "amber_g": Benchmark(
        "AMBER, generative queries only (ids 1-1004)",
        f"{_AMBER}:amber_queries",
        f"{_AMBER}:write_amber",
        "eval/amber.py",
    ),
    "amber_d": Benchmark(
        "AMBER, discriminative queries only", f"{_AMBER}:amber_queries", f"{_AMBER}:write_amber", "eval/amber.py"
    ),
    "llava_bench": Benchmark(
        "LLaVA-Bench (In-the-Wild): a judge scores answer and reference 1-10",
        "capdpo.evaluation.llava_bench:llava_queries",
        "capdpo.evaluation.llava_bench:write_llava",
        "eval/llava_bench.py",
        Report(
            "llava_bench",
            "LLaVA-Bench (In-the-Wild)",
            ("llava_bench.json",),
            (
                Row("Overall", (("relative_score",),), True),
                Row("Conversation", (("categories", "conv", "relative_score"),), True),
                Row("Detail", (("categories", "detail", "relative_score"),), True),
                Row("Complex reasoning", (("categories", "complex", "relative_score"),), True),
            ),
        ),
    ),
    "pope": Benchmark(
        "POPE: yes/no object probing on COCO (random, popular, adversarial splits)",
        "capdpo.evaluation.pope:pope_queries",
        "capdpo.evaluation.pope:write_pope",
        "eval/pope.py",
        Report(
            "pope",
            "POPE (COCO)",
            ("pope.json",),
            (
                Row("F1 (mean of splits)", (("mean", "f1"),), True, None),
                Row("Accuracy (mean of splits)", (("mean", "accuracy"),), True, None),
                Row("Precision (mean of splits)", (("mean", "precision"),), True, None),
                Row("Recall (mean of splits)", (("mean", "recall"),), True, None),
            ),
        ),
    ),
    "objhal": Benchmark(
        "Object HalBench: 300 COCO descriptions, objects extracted by a judge and matched to COCO",
        "capdpo.evaluation.objhal:objhal_queries",
        "capdpo.evaluation.objhal:write_objhal",
        "eval/objhal.py",
        Report(
            "objhal",
            "Object HalBench",
            ("objhal.json",),
            (
                Row("Response Hall", (("Response Hall",),), False, 2),
                Row("Object Hall", (("Object Hall",),), False, 2),
                Row("Object Recall", (("Object Recall",),), True, 2),
            ),
        ),
    ),
    "coco": Benchmark(
        "COCO captions scored with CHAIR",
        "capdpo.evaluation.chair:coco_queries",
        "capdpo.evaluation.chair:write_coco",
        "eval/chair.py",
        Report(
            "chair",
            "CHAIR (COCO)",
            ("chair.json",),
            (
                Row("CHAIR_s", (("CHAIR_s",),), False, None),
                Row("CHAIR_i", (("CHAIR_i",),), False, None),
                Row("Recall", (("recall",), ("Recall",)), True, None),
                Row("BLEU-4", (("BLEU-4",), ("BLEU4",), ("bleu4",), ("BLEU",), ("bleu",)), True, None),
                Row("ROUGE-L", (("ROUGE-L",), ("ROUGE_L",), ("rouge_l",), ("rougeL",)), True, None),
                Row("Critic (0-100)", (("Critic",),), True),
            ),
        ),
    ),
}
# the report's benchmarks, in table order
REPORTED = {b.report.name: b.report for b in BENCHMARKS.values() if b.report is not None}


def need(path: str, flag: str, benchmark: str) -> Path:
    """A path option a benchmark cannot do without."""
    if not path:
        raise ConfigError(f"answers: --{flag} is required for --benchmark {benchmark}")
    return Path(path)


def model_label(model: str, adapter: str, model_id: str = "") -> str:
    """How answer files name the answering model: `model_id`, else the model folder's name [+ the adapter's]."""
    base = Path(model.rstrip("/")).name or model
    return model_id or (base + (f"+{Path(adapter.rstrip('/')).name}" if adapter else ""))
