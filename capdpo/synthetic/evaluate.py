"""Evaluate a model (+ optional adapter) on held-out synthetic images: descriptions and yes/no questions.

    python -m capdpo evaluate-synthetic --model models/synthetic/strong --world runs/synthetic/world \\
        [--adapter runs/synthetic/seed0/06_train/adapter] --out runs/synthetic/eval/after

Writes `descriptions.jsonl` (greedy descriptions of the test split), `answers.jsonl` (the model's yes/no answers
read from P(yes) vs P(no), like stage 4's `yesno`) and `metrics.json` (CHAIR_s, CHAIR_i, coverage, exact-claim
figures, discriminative accuracy per question kind). See `capdpo.synthetic.scoring` for the definitions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options, run_cli
from capdpo.config import option
from capdpo.synthetic.tasks import Question, yes_no_questions
from capdpo.synthetic.world import DEFAULT_BIAS, DESCRIBE_PROMPT, BiasRule, WorldImage, read_split


@dataclass
class EvalSettings:
    """How a model is evaluated."""

    max_new_tokens: int = 96
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"  # the synthetic models are trained in fp32; bf16 would change greedy outputs
    describe: bool = True
    questions: bool = True
    rules: tuple[BiasRule, ...] = DEFAULT_BIAS  # the strong model's planted bias, counted as `planted`


def test_questions(
    items: list[WorldImage], seed: int = 0, rules: tuple[BiasRule, ...] = DEFAULT_BIAS
) -> list[Question]:
    """The fixed yes/no questions of a test split (seeded, so every model answers the same ones)."""
    rng = random.Random(f"capdpo-synthetic-questions:{seed}")
    return [q for item in items for q in yes_no_questions(item, rng, rules)]


def describe(lm: Any, items: list[WorldImage], settings: EvalSettings) -> list[str]:
    """Greedy descriptions of `items` with the describe prompt stage 2 uses."""
    from capdpo.generation.batching import Request, user_message
    from capdpo.generation.engine import Engine
    from capdpo.generation.sampling import Generation

    engine = Engine(lm)
    requests = [Request(key=item.id, image=item.image, messages=[user_message(DESCRIBE_PROMPT)]) for item in items]
    texts: dict[str, str] = {}
    gen = Generation(max_new_tokens=settings.max_new_tokens, temperature=0.0)
    for batch in engine.plan(requests, settings.batch_size):
        texts.update({o.key: o.text for o in engine.generate(batch, gen)})
    return [texts[item.id] for item in items]


def answer(lm: Any, questions: list[Question], settings: EvalSettings) -> list[dict[str, Any]]:
    """Each question answered yes when P(yes) > P(no) at the answer's first token (one forward pass; the questions
    of one image share its prefix's pass, as in stage 4)."""
    from capdpo.generation.batching import Request, user_message
    from capdpo.generation.engine import Engine
    from capdpo.validation.methods import answer_token_ids

    engine = Engine(lm, decoder="hf")
    yes = answer_token_ids(lm, ["Yes", "yes"])
    no = answer_token_ids(lm, ["No", "no"])
    requests = [
        Request(key=str(i), image=q.image, messages=[user_message(q.question)]) for i, q in enumerate(questions)
    ]
    p_yes: dict[str, float] = {}
    for key, logprobs in engine.score(requests, settings.batch_size, keep=sorted({*yes, *no})).items():
        y, n = float(logprobs[0][yes].exp().sum()), float(logprobs[0][no].exp().sum())
        p_yes[key] = y / (y + n) if y + n > 0 else 0.5
    rows = []
    for i, q in enumerate(questions):
        p = p_yes[str(i)]
        rows.append({**q.to_dict(), "p_yes": round(p, 5), "predicted": "yes" if p > 0.5 else "no"})
    return rows


def evaluate_model(
    model: str,
    items: list[WorldImage],
    questions: list[Question],
    out: str | Path,
    adapter: str | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Describe the test images and answer the questions; write descriptions, answers and metrics to `out`."""
    from capdpo.jsonl import write_json, write_jsonl
    from capdpo.models.loading import load_vlm
    from capdpo.synthetic.scoring import planted_hallucinations, score_answers, score_descriptions

    settings = settings or EvalSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_vlm(model, device=settings.device, dtype=settings.dtype, adapter=adapter, field="model")
    metrics: dict[str, Any] = {"model": model, "adapter": adapter, "images": len(items)}
    if settings.describe:
        texts = describe(lm, items, settings)
        write_jsonl(
            out / "descriptions.jsonl",
            [
                {"image_id": i.id, "image": i.image, "description": t, "truth": i.scene.description()}
                for i, t in zip(items, texts)
            ],
        )
        metrics["generative"] = score_descriptions((i.scene, t) for i, t in zip(items, texts))
        metrics["generative"]["planted"] = planted_hallucinations(
            ((i.scene, t) for i, t in zip(items, texts)), settings.rules
        )
    if settings.questions and questions:
        rows = answer(lm, questions, settings)
        write_jsonl(out / "answers.jsonl", rows)
        metrics["discriminative"] = score_answers(rows)
    write_json(out / "metrics.json", metrics)
    return metrics


@dataclass
class EvaluateOptions:
    """`python -m capdpo evaluate-synthetic`: a model's descriptions and yes/no answers on held-out images."""

    model: str = option("Model folder (e.g. models/synthetic/strong).", "")
    world: str = option("World folder holding test.jsonl (from the experiment).", "")
    adapter: str = option("Optional PEFT adapter folder applied on top.", "")
    out: str = option("Folder for descriptions.jsonl, answers.jsonl, metrics.json.", "")
    device: str = option("'auto', 'cpu' or 'cuda'.", "auto")
    limit: int = option("Evaluate only the first N test images (0: all).", 0)


def main(argv: list[str] | None = None) -> None:
    def _run(args: list[str] | None) -> None:
        import json

        opts = parse_options(EvaluateOptions, args, __doc__.split("\n\n")[0], required=("model", "world", "out"))
        items = read_split(Path(opts.world) / "test.jsonl")
        items = items[: opts.limit] if opts.limit else items
        metrics = evaluate_model(
            opts.model, items, test_questions(items), opts.out, opts.adapter or None, EvalSettings(device=opts.device)
        )
        print(json.dumps({k: v for k, v in metrics.items() if k in ("generative", "discriminative")}, indent=1))

    run_cli(_run, argv)
