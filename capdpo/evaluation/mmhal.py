"""MMHal-Bench: a judge rates each answer 0–6; ratings below 3 count as hallucination.

    python eval/mmhal.py --answers runs/demo/eval/base/answers/mmhal.json --out runs/demo/eval/base/mmhal.json \
        --judge_url https://api.openai.com/v1 --judge_model gpt-4-0613 --api_key_env OPENAI_API_KEY
    python eval/mmhal.py --answers ... --out ... --judge_local Qwen/Qwen2.5-VL-7B-Instruct

`--answers` is the benchmark's 96-question list (`response_template.json` layout) with `model_answer` filled in,
as `eval/answers.py --benchmark mmhal` writes it. `--out` gets the metrics JSON: average rating and hallucination
rate overall and per question type; beside it `<stem>.reviews.jsonl` (every judge reply with its parsed rating)
and `<stem>.judge_cache.jsonl` (replies reused by a rerun).

Two protocols (`--protocol`):
- published (the default when `--prompt` is the benchmark's own template, the `template` string of LLaVA-RLHF's
  `Eval/eval_gpt_mmhal.py` saved as a file, with its four positional `{}`): the template filled in order (image
  contents joined by ", ", question, standard answer, model answer), sent as one user message at temperature 0
  with no token limit; a reply's rating is the one N in 0–6 for which "rating: N" occurs in the lower-cased reply,
  0 when none or several do; question types by position (i mod 8); figures rounded to 2 decimals as printed.
- capdpo: a capdpo prompt file (default `eval/prompts/mmhal_judge.txt`); a reply must hold exactly one rating
  ("Rating: N", "**Rating:** N", "Rating: 2."; not "Rating: 5.5"). Others are counted as unparseable, listed in the
  metrics and left out of the averages (`--unparseable zero` scores them 0 instead).
"""

from __future__ import annotations

import re
import string
import sys
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import Query, need
from capdpo.evaluation.config import MMHalConfig
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
from capdpo.jsonl import read_json, write_json
from capdpo.sections import load_config

# The benchmark's eight question types, in the order its 96 questions cycle through them.
QUESTION_TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")
HALLUCINATION_BELOW = 3
PLACEHOLDERS = ("image_content", "question", "gt_answer", "model_answer")
_RATING = re.compile(r"rating\s*\**\s*[:：]\s*\**\s*([0-6])(?![0-9]|\.[0-9])", re.IGNORECASE)


def parse_rating(reply: str) -> int | None:
    """capdpo protocol: the 0–6 rating in a judge reply, or None when it holds none or several different ones."""
    found = {int(m) for m in _RATING.findall(reply)}
    return found.pop() if len(found) == 1 else None


def parse_rating_published(reply: str) -> int | None:
    """Published protocol: the one N in 0–6 with "rating: N" in the lower-cased reply; None (scored 0) when no N or
    several do. "Rating: 5.5" is 5, "Rating:6" and "**Rating:** 6" hold no rating."""
    found = [n for n in range(7) if f"rating: {n}" in reply.lower()]
    return found[0] if len(found) == 1 else None


def published_template(prompt: PublishedPrompt) -> bool:
    """Whether a prompt file is a published-style template: exactly four positional `{}` fields."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt.text) if f is not None]
    except ValueError as err:
        raise ConfigError(f"prompt: {prompt.path}: not a format template ({err})") from None
    return len(fields) == len(PLACEHOLDERS) and all(f == "" for f in fields)


def question_type(record: dict[str, Any], index: int) -> str:
    """The record's `question_type`, else the type its position gives (the questions cycle through the 8 types)."""
    value = record.get("question_type")
    return value if isinstance(value, str) and value else QUESTION_TYPES[index % len(QUESTION_TYPES)]


def _rate(scores: list[int]) -> dict[str, Any]:
    if not scores:
        return {"avg_score": None, "hallucination_rate": None, "n_scored": 0}
    return {
        "avg_score": round(sum(scores) / len(scores), 4),
        "hallucination_rate": round(sum(s < HALLUCINATION_BELOW for s in scores) / len(scores), 4),
        "n_scored": len(scores),
    }


def mmhal_metrics(types: list[str], ratings: list[int | None], unparseable: str = "skip") -> dict[str, Any]:
    """Average rating and hallucination rate (share of ratings < 3), overall and per question type.

    Args:
        types: question type of each answer.
        ratings: parsed rating of each answer (None: unparseable reply).
        unparseable: 'skip' leaves unparseable replies out of the averages, 'zero' scores them 0.
    """
    scored = [
        (t, r if r is not None else 0)
        for t, r in zip(types, ratings, strict=True)
        if r is not None or unparseable == "zero"
    ]
    per_type = {}
    order = [t for t in QUESTION_TYPES if t in types] + sorted({t for t in types if t not in QUESTION_TYPES})
    for name in order:
        per_type[name] = {**_rate([r for t, r in scored if t == name]), "n": types.count(name)}
    bad = [i for i, r in enumerate(ratings) if r is None]
    return {
        "benchmark": "mmhal",
        **_rate([r for _, r in scored]),
        "n": len(ratings),
        "unparseable": len(bad),
        "unparseable_policy": unparseable,
        "question_types": per_type,
    }


def mmhal_metrics_published(ratings: list[int | None]) -> dict[str, Any]:
    """The published script's figures: unreadable replies score 0, types by position, means rounded to 2
    decimals as printed (`exact` keeps the unrounded overall figures)."""
    scores = [r if r is not None else 0 for r in ratings]
    by_type: dict[str, list[int]] = {name: [] for name in QUESTION_TYPES}
    for i, score in enumerate(scores):
        by_type[QUESTION_TYPES[i % len(QUESTION_TYPES)]].append(score)
    avg = sum(scores) / len(scores)
    rate = sum(s < HALLUCINATION_BELOW for s in scores) / len(scores)
    per_type = {
        name: {
            "avg_score": round(sum(v) / len(v), 2) if v else None,
            "hallucination_rate": round(sum(s < HALLUCINATION_BELOW for s in v) / len(v), 2) if v else None,
            "n_scored": len(v),
            "n": len(v),
        }
        for name, v in by_type.items()
    }
    return {
        "benchmark": "mmhal",
        "avg_score": round(avg, 2),
        "hallucination_rate": round(rate, 2),
        "n_scored": len(scores),
        "n": len(scores),
        "unparseable": sum(r is None for r in ratings),
        "unparseable_policy": "zero",
        "question_types": per_type,
        "exact": {"avg_score": avg, "hallucination_rate": rate},
    }


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The answers file: a JSON list of question records, each with question, gt_answer and model_answer."""
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON list of MMHal-Bench question records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: record {i} is not an object")
        for key in ("question", "gt_answer", "model_answer"):
            if not isinstance(record.get(key), str):
                hint = (
                    " — generate answers first with eval/answers.py --benchmark mmhal" if key == "model_answer" else ""
                )
                raise InputError(f"{path}: record {i} has no text field '{key}'{hint}")
    return records


def _image_content(record: dict[str, Any]) -> str:
    content = record.get("image_content", "")
    return ", ".join(map(str, content)) if isinstance(content, list) else str(content)


def published_messages(prompt: PublishedPrompt, record: dict[str, Any]) -> list[dict[str, str]]:
    """The published request: the template's four `{}` filled in order, one user message."""
    text = prompt.text.format(_image_content(record), record["question"], record["gt_answer"], record["model_answer"])
    return [{"role": "user", "content": text}]


def judge_messages(prompt: JudgePrompt, record: dict[str, Any]) -> list[dict[str, str]]:
    return prompt.render(
        image_content=_image_content(record),
        question=record["question"],
        gt_answer=record["gt_answer"],
        model_answer=record["model_answer"],
    )


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Judge every answer of the answers file and write the metrics, reviews and cache."""
    sec: MMHalConfig = cfg.section
    if not sec.answers or not sec.out:
        raise ConfigError("mmhal: --answers FILE and --out FILE are required")
    records = read_answers(sec.answers)
    if len(records) != 96:
        print(f"note: {sec.answers} has {len(records)} questions (the full benchmark has 96)", file=sys.stderr)
    published_file = False
    if sec.prompt:
        own = PublishedPrompt.load(sec.prompt)
        published_file = published_template(own)
    protocol = sec.use_protocol(published_file, published=(0.0, 0), capdpo=(0.0, 1024))
    if protocol == "published" and not published_file:
        raise ConfigError(
            "mmhal: --protocol published fills the benchmark's own judge template; pass it with --prompt FILE (the "
            "`template` string of LLaVA-RLHF's Eval/eval_gpt_mmhal.py, four positional {} placeholders)"
        )
    prompt: JudgePrompt | PublishedPrompt
    if published_file:
        prompt = own
        items = [JudgeItem(str(i), published_messages(own, r)) for i, r in enumerate(records)]
    else:
        prompt = JudgePrompt.load(sec.prompt or default_prompt("mmhal"), PLACEHOLDERS)
        items = [JudgeItem(str(i), judge_messages(prompt, r)) for i, r in enumerate(records)]
    judge = make_judge(sec, cfg.common)
    result = judge_items(items, judge, sec.cache or default_side_path(sec.out, ".judge_cache.jsonl"))

    if protocol == "published":
        types = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(len(records))]
        ratings = [parse_rating_published(result.replies[str(i)]) for i in range(len(records))]
        metrics = mmhal_metrics_published(ratings)
    else:
        types = [question_type(r, i) for i, r in enumerate(records)]
        ratings = [parse_rating(result.replies[str(i)]) for i in range(len(records))]
        metrics = mmhal_metrics(types, ratings, sec.unparseable)
    metrics["protocol"] = protocol
    metrics["unparseable_ids"] = [i for i, r in enumerate(ratings) if r is None]
    reviews = (
        {
            "question_id": i,
            "question_type": t,
            "image_id": r.get("image_id"),
            "rating": rating,
            "hallucination": (
                (rating or 0) < HALLUCINATION_BELOW
                if protocol == "published"
                else (None if rating is None else rating < HALLUCINATION_BELOW)
            ),
            "parsed": rating is not None,
            "reply": result.replies[str(i)],
        }
        for i, (r, t, rating) in enumerate(zip(records, types, ratings, strict=True))
    )
    return write_judged(cfg, metrics, reviews, judge, prompt, result, {"answers": str(sec.answers)}, format_summary)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(metrics: dict[str, Any], source: str | Path) -> str:
    """A readable table of the metrics (what the published script prints, plus the parse accounting)."""
    lines = [
        f"MMHal-Bench — {source}",
        f"  average rating:      {_fmt(metrics['avg_score'])}  (0–6, higher is better)",
        f"  hallucination rate:  {_fmt(metrics['hallucination_rate'])}  (share rated < 3, lower is better)",
        f"  judged: {metrics['n_scored']} of {metrics['n']}; unparseable judge replies: {metrics['unparseable']}"
        + (
            f" (questions {metrics.get('unparseable_ids')}, policy '{metrics['unparseable_policy']}')"
            if metrics["unparseable"]
            else ""
        ),
        "  per question type:   type          avg   hal.rate  n",
    ]
    for name, row in metrics["question_types"].items():
        lines.append(
            f"                       {name:<12} {_fmt(row['avg_score']):>5}  {_fmt(row['hallucination_rate']):>7}  {row['n']}"
        )
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark mmhal) --------------------------------------------------------
def mmhal_image(record: dict[str, Any], images: Path) -> Path:
    """The local image of an MMHal-Bench question: `image_path` if it exists, else the file name of `image_src`."""
    local = record.get("image_path")
    if isinstance(local, str) and Path(local).is_file():
        return Path(local)
    source = record.get("image_src") or local or ""
    name = str(source).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return images / name


def mmhal_queries(sec: Any, seed: int = 0) -> tuple[list[Query], list[dict[str, Any]]]:
    data, images = need(sec.data, "data", "mmhal"), need(sec.images, "images", "mmhal")
    records = read_json(data)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{data}: expected MMHal-Bench's JSON list of question records")
    queries = []
    for i, record in enumerate(records):
        if not isinstance(record.get("question"), str) or not (record.get("image_src") or record.get("image_path")):
            raise InputError(f"{data}: record {i} needs 'question' and 'image_src' (or 'image_path')")
        queries.append(Query(str(i), i, mmhal_image(record, images), record["question"] + sec.query_suffix))
    return queries, records


def write_mmhal(sec: Any, queries: list[Query], answers: list[dict[str, Any]], records: Any) -> dict[str, Any]:
    """The benchmark's question list with `model_answer` filled in."""
    records = [dict(r) for r in records]
    for q, a in zip(queries, answers, strict=True):
        records[q.question_id]["model_answer"] = a["text"]
    if len(queries) < len(records):  # --limit: keep only the answered questions, in order
        records = records[: len(queries)]
    write_json(sec.out, records)
    return {}


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("mmhal", a, __doc__)), argv)
