"""LLaVA-Bench (In-the-Wild): a judge scores the reference and the model answer 1–10; relative score per category.

    python eval/llava_bench.py --answers runs/demo/eval/base/answers/llava_bench.jsonl \
        --questions DATA/llava-bench-in-the-wild/questions.jsonl --context DATA/llava-bench-in-the-wild/context.jsonl \
        --reference DATA/llava-bench-in-the-wild/answers_gpt4.jsonl --out runs/demo/eval/base/llava_bench.json \
        --judge_url https://api.openai.com/v1 --judge_model gpt-4-0314 --api_key_env OPENAI_API_KEY

As published, the judge sees the image's text context, the question, the reference answer (assistant 1) and the
model's answer (assistant 2), and scores both 1–10 on the first line of its reply. The relative score of a category
is mean(model) / mean(reference) × 100 over the questions of that category (`conv`, `detail`, `complex`), and over
all questions for the overall figure.

Two protocols (`--protocol`):
- published (the default when `--prompt` is the benchmark's own `rule.json`, as in LLaVA's `llava/eval/table/`):
  the rule of key `llava_bench_<category>` and the published message layout ([Context], [Question], [Assistant 1],
  [End of Assistant 1], ..., [System] + the rule's prompt), the published system message, temperature 0.2 and
  1024 tokens; a reply's scores are its first line with commas read as spaces, split on single spaces: exactly two
  numbers, else [-1, -1], which stays in the means as published; each mean rounded to 3 decimals before the
  relative score is taken (round(model / reference × 100, 1)), and the means reported ×10, rounded to 1 decimal.
- capdpo: a capdpo prompt file (default `eval/prompts/llava_bench_judge.txt`, or a rule.json); the first line must
  hold exactly two numbers in [0, 10] ("8 7", "8, 7", "**8 7**", "8/10 7/10", "Assistant 1: 8, Assistant 2: 7");
  other replies are counted as unparseable, listed in the metrics and left out of every mean; means unrounded.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import Query, model_label, need
from capdpo.evaluation.config import LlavaBenchConfig
from capdpo.evaluation.judge import (
    JudgeItem,
    JudgePrompt,
    PublishedPrompt,
    default_prompt,
    default_side_path,
    judge_items,
    make_judge,
    write_judged,
)
from capdpo.jsonl import read_json, read_jsonl, stable_id, write_jsonl
from capdpo.sections import load_config

CATEGORIES = ("conv", "detail", "complex")
PLACEHOLDERS = ("context", "question", "reference_answer", "model_answer", "category")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, model score) from the first non-empty line of a reply, or None.

    The line must hold exactly two numbers in [0, 10]: "8 7", "8, 7", "**8 7**", "8/10 7/10" and
    "Assistant 1: 8, Assistant 2: 7" all parse.
    """
    for line in reply.splitlines():
        line = line.strip().strip("*#` ").strip()
        if line:
            break
    else:
        return None
    line = re.sub(r"assistant\s*[12]\s*[:=-]?", " ", line, flags=re.IGNORECASE)
    line = re.sub(r"/\s*10(?!\d)", " ", line)  # "8/10 7/10"
    numbers = [float(n) for n in _NUMBER.findall(line)]
    if len(numbers) != 2 or not all(0 <= n <= 10 for n in numbers):
        return None
    return numbers[0], numbers[1]


PUBLISHED_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


def parse_scores_published(reply: str) -> tuple[float, float]:
    """Published protocol: the first line, commas read as spaces, split on single spaces; exactly two numbers, else
    (-1, -1) (kept in the means, as published)."""
    parts = reply.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return -1.0, -1.0
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return -1.0, -1.0


def _published_summary(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
    model = round(sum(p[1] for p in pairs) / len(pairs), 3)
    return {
        "relative_score": round(model / ref * 100, 1) if ref else None,
        "reference_score": round(ref * 10, 1),
        "model_score": round(model * 10, 1),
        "n_scored": len(pairs),
    }


def llava_metrics_published(categories: list[str], scores: list[tuple[float, float]]) -> dict[str, Any]:
    """The published summary: per category and overall, means (malformed replies as -1, -1 included) rounded to 3
    decimals, then relative = round(model / reference × 100, 1) and both means ×10 rounded to 1 decimal."""
    order = [c for c in CATEGORIES if c in categories] + sorted({c for c in categories if c not in CATEGORIES})
    per_category = {
        c: {**_published_summary([s for cat, s in zip(categories, scores, strict=True) if cat == c]),
            "n": categories.count(c)}
        for c in order
    }  # fmt: skip
    return {
        "benchmark": "llava_bench",
        **_published_summary(scores),
        "n": len(scores),
        "unparseable": sum(s == (-1.0, -1.0) for s in scores),
        "categories": per_category,
    }


def read_rules(prompt: PublishedPrompt) -> dict[str, dict[str, str]] | None:
    """The rules of a rule.json prompt file (None when the file is a capdpo prompt file)."""
    if prompt.path.suffix != ".json":
        return None
    rules = read_json(prompt.path)
    if not isinstance(rules, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("role"), str)
        for r in rules.values()
    ):
        raise ConfigError(f"prompt: {prompt.path}: a rule file maps keys to objects with 'role' and 'prompt'")
    return rules


def published_messages(rules: dict[str, dict[str, str]], row: dict[str, Any], path: Path) -> list[dict[str, str]]:
    """The published request of one question: the rule of `llava_bench_<category>` in the published layout."""
    key = f"llava_bench_{row['category']}"
    if key not in rules:
        raise InputError(f"{path}: no rule '{key}' for question_id {row['question_id']} (category {row['category']})")
    role, rule = rules[key]["role"], rules[key]["prompt"]
    content = (
        f"[Context]\n{row['context']}\n\n"
        f"[Question]\n{row['question']}\n\n"
        f"[{role} 1]\n{row['reference_answer']}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{row['model_answer']}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule}\n\n"
    )
    return [{"role": "system", "content": PUBLISHED_SYSTEM}, {"role": "user", "content": content}]


def _relative(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    if not pairs:
        return {"relative_score": None, "reference_score": None, "model_score": None, "n_scored": 0}
    ref = sum(p[0] for p in pairs) / len(pairs)
    model = sum(p[1] for p in pairs) / len(pairs)
    return {
        "relative_score": round(model / ref * 100, 1) if ref > 0 else None,
        "reference_score": round(ref, 3),
        "model_score": round(model, 3),
        "n_scored": len(pairs),
    }


def llava_metrics(categories: list[str], scores: list[tuple[float, float] | None]) -> dict[str, Any]:
    """Relative score (mean model / mean reference × 100) per category and overall; unparseable replies are
    counted and left out."""
    pairs = [(c, s) for c, s in zip(categories, scores, strict=True) if s is not None]
    order = [c for c in CATEGORIES if c in categories] + sorted({c for c in categories if c not in CATEGORIES})
    per_category = {c: {**_relative([s for cat, s in pairs if cat == c]), "n": categories.count(c)} for c in order}
    return {
        "benchmark": "llava_bench",
        **_relative([s for _, s in pairs]),
        "n": len(scores),
        "unparseable": sum(s is None for s in scores),
        "categories": per_category,
    }


def _by_id(path: str, records: list[dict[str, Any]], what: str) -> dict[str, dict[str, Any]]:
    out = {}
    for number, record in enumerate(records, start=1):
        if "question_id" not in record:
            raise InputError(f"{path}:{number}: {what} record has no 'question_id'")
        out[str(record["question_id"])] = record
    return out


def load_inputs(sec: LlavaBenchConfig) -> list[dict[str, Any]]:
    """One dict per question: question record, context text, reference text, model answer text."""
    missing = [f"--{k}" for k in ("answers", "questions", "context", "reference", "out") if not getattr(sec, k)]
    if missing:
        raise ConfigError(f"llava_bench: {', '.join(missing)} required")
    questions = read_jsonl(sec.questions)
    answers = _by_id(sec.answers, read_jsonl(sec.answers), "answer")
    reference = _by_id(sec.reference, read_jsonl(sec.reference), "reference")
    contexts = {}
    for number, record in enumerate(read_jsonl(sec.context), start=1):
        if "image" not in record or "caption" not in record:
            raise InputError(f"{sec.context}:{number}: context record needs 'image' and 'caption'")
        caption = record["caption"]
        contexts[record["image"]] = "\n".join(caption) if isinstance(caption, list) else str(caption)
    rows = []
    for number, q in enumerate(questions, start=1):
        for key in ("question_id", "image", "text", "category"):
            if key not in q:
                raise InputError(f"{sec.questions}:{number}: question has no '{key}'")
        qid = str(q["question_id"])
        for table, path, what in (
            (answers, sec.answers, "model answer"),
            (reference, sec.reference, "reference answer"),
        ):
            if qid not in table or not isinstance(table[qid].get("text"), str):
                raise InputError(f"{path}: no {what} (with 'text') for question_id {qid}")
        if q["image"] not in contexts:
            raise InputError(f"{sec.context}: no context for image '{q['image']}' (question_id {qid})")
        rows.append(
            {
                "question_id": q["question_id"],
                "category": str(q["category"]),
                "question": q["text"],
                "context": contexts[q["image"]],
                "reference_answer": reference[qid]["text"],
                "model_answer": answers[qid]["text"],
                "answer_id": answers[qid].get("answer_id"),
            }
        )
    extra = set(answers) - {str(r["question_id"]) for r in rows}
    if extra:
        print(f"note: {len(extra)} answer(s) in {sec.answers} match no question and are ignored", file=sys.stderr)
    return rows


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Judge every question's reference and model answers; write metrics, reviews and cache."""
    sec: LlavaBenchConfig = cfg.section
    rows = load_inputs(sec)
    rules = read_rules(PublishedPrompt.load(sec.prompt)) if sec.prompt else None
    protocol = sec.use_protocol(rules is not None, published=(0.2, 1024), capdpo=(0.0, 1024))
    if protocol == "published" and rules is None:
        raise ConfigError(
            "llava_bench: --protocol published reads the benchmark's own rules; pass --prompt "
            "llava/eval/table/rule.json (from the LLaVA repository)"
        )
    prompt: JudgePrompt | PublishedPrompt
    if rules is not None:
        prompt = PublishedPrompt.load(sec.prompt)
        items = [JudgeItem(str(r["question_id"]), published_messages(rules, r, prompt.path)) for r in rows]
    else:
        prompt = JudgePrompt.load(sec.prompt or default_prompt("llava_bench"), PLACEHOLDERS)
        items = [
            JudgeItem(
                str(r["question_id"]),
                prompt.render(**{k: r[k] for k in PLACEHOLDERS if k != "category"}, category=r["category"]),
            )
            for r in rows
        ]
    judge = make_judge(sec, cfg.common)
    result = judge_items(items, judge, sec.cache or default_side_path(sec.out, ".judge_cache.jsonl"))

    categories = [r["category"] for r in rows]
    replies = [result.replies[str(r["question_id"])] for r in rows]
    scores: list[tuple[float, float] | None]
    if protocol == "published":
        published = [parse_scores_published(reply) for reply in replies]
        metrics = llava_metrics_published(categories, published)
        scores = [None if s == (-1.0, -1.0) else s for s in published]
    else:
        scores = [parse_scores(reply) for reply in replies]
        metrics = llava_metrics(categories, scores)
    metrics["protocol"] = protocol
    metrics["unparseable_ids"] = [r["question_id"] for r, s in zip(rows, scores, strict=True) if s is None]
    reviews = (
        {
            "question_id": r["question_id"],
            "category": r["category"],
            "answer_id": r["answer_id"],
            "scores": list(s) if s else None,  # [reference, model]
            "parsed": s is not None,
            "reply": result.replies[str(r["question_id"])],
        }
        for r, s in zip(rows, scores, strict=True)
    )
    files = {"answers": sec.answers, "questions": sec.questions, "reference": sec.reference}
    return write_judged(cfg, metrics, reviews, judge, prompt, result, files, format_summary)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(metrics: dict[str, Any], source: str | Path) -> str:
    """Relative score, reference and model mean per category (as the published summary prints them)."""
    lines = [
        f"LLaVA-Bench (In-the-Wild) — {source} (protocol {metrics.get('protocol', 'capdpo')}"
        + ("; means ×10 as published)" if metrics.get("protocol") == "published" else ")"),
        "  category   relative  reference  model   n",
        f"  {'all':<9}  {_fmt(metrics['relative_score']):>8}  {_fmt(metrics['reference_score'], 2):>9}  "
        f"{_fmt(metrics['model_score'], 2):>5}  {metrics['n_scored']}",
    ]
    for name, row in metrics["categories"].items():
        lines.append(
            f"  {name:<9}  {_fmt(row['relative_score']):>8}  {_fmt(row['reference_score'], 2):>9}  "
            f"{_fmt(row['model_score'], 2):>5}  {row['n_scored']}"
        )
    bad = metrics["unparseable"]
    lines.append(
        f"  unparseable judge replies: {bad}"
        + (f" (question_ids {metrics.get('unparseable_ids')}; left out)" if bad else "")
    )
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark llava_bench) --------------------------------------------------
def llava_queries(sec: Any, seed: int = 0) -> tuple[list[Query], dict[str, dict[str, Any]]]:
    data, images = need(sec.data, "data", "llava_bench"), need(sec.images, "images", "llava_bench")
    queries, questions = [], {}
    for number, q in enumerate(read_jsonl(data), start=1):
        if "question_id" not in q or "image" not in q or not isinstance(q.get("text"), str):
            raise InputError(f"{data}:{number}: a question needs 'question_id', 'image' and 'text'")
        key = str(q["question_id"])
        if key in questions:
            raise InputError(f"{data}:{number}: question_id {key} appears twice")
        questions[key] = q
        queries.append(Query(key, q["question_id"], images / q["image"], q["text"] + sec.query_suffix))
    return queries, questions


def write_llava(sec: Any, queries: list[Query], answers: list[dict[str, Any]], questions: Any) -> dict[str, Any]:
    """JSONL with `question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`, as the review script reads."""
    label = model_label(sec.model, sec.adapter, sec.model_id)
    rows = [
        {
            "question_id": q.question_id,
            "prompt": questions[q.key]["text"],
            "text": a["text"],
            "answer_id": stable_id("llava_bench_answer", a["settings"], q.key),
            "model_id": label,
            "metadata": {"adapter": sec.adapter or None, "finish_reason": a["finish_reason"]},
        }
        for q, a in zip(queries, answers, strict=True)
    ]
    write_jsonl(sec.out, rows)
    return {}


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("llava_bench", a, __doc__)), argv)
