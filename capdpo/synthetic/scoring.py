"""Scoring descriptions and yes/no answers against the synthetic world's ground truth (pure functions).

Object hallucination follows CHAIR's definitions (as `capdpo.evaluation.chair` computes them for COCO), over the
synthetic vocabulary, where every shape noun is its own category:

- CHAIR_i: hallucinated object mentions / all object mentions (each mention counts);
- CHAIR_s: descriptions with at least one hallucinated mention / all descriptions;
- coverage: ground-truth object categories mentioned / ground-truth categories (CHAIR's recall, AMBER's Cover).

Because the language is closed, sentences are also parsed into (size, colour, shape, position) claims and
checked cell by cell: `sentence_accuracy` is the share of claims that are exactly right and `object_recall` the
share of ground-truth objects described exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from capdpo.synthetic.world import COLOURS, POSITIONS, SHAPES, SIZES, BiasRule, Scene

_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")(?:e?s)?\b", re.IGNORECASE)
_CLAIM = re.compile(
    r"\b("
    + "|".join(SIZES)
    + r") ("
    + "|".join(COLOURS)
    + r") ("
    + "|".join(SHAPES)
    + r") (?:is )?at the ("
    + "|".join(POSITIONS)
    + r")\b",
    re.IGNORECASE,
)


def object_mentions(text: str) -> list[str]:
    """Shape nouns of a text, in order, one entry per mention (plurals count as their singular)."""
    return [m.group(1).lower() for m in _SHAPE_WORD.finditer(text)]


def parse_claims(text: str) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, position) of every sentence of the synthetic language found in a text."""
    return [tuple(g.lower() for g in m.groups()) for m in _CLAIM.finditer(text)]  # type: ignore[misc]


def wrong_claims(text: str, scene: Scene) -> tuple[int, int]:
    """(claims of `text` that are not exactly right, claims); a shape named outside a parsable claim counts as a
    wrong claim."""
    truth = {(o.size, o.colour, o.shape, o.position) for o in scene.objects}
    claims = parse_claims(text)
    unparsed = max(0, len(object_mentions(text)) - len(claims))
    return sum(c not in truth for c in claims) + unparsed, len(claims) + unparsed


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def score_descriptions(items: Iterable[tuple[Scene, str]]) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i, coverage and exact-claim figures (percentages) of descriptions of known scenes."""
    counts: Counter[str] = Counter()
    hallucinated_words: Counter[str] = Counter()
    for scene, text in items:
        mentions = object_mentions(text)
        present = scene.shapes
        wrong = [m for m in mentions if m not in present]
        counts["descriptions"] += 1
        counts["hallucinated_descriptions"] += bool(wrong)
        counts["mentions"] += len(mentions)
        counts["hallucinated_mentions"] += len(wrong)
        counts["categories"] += len(present)
        counts["categories_mentioned"] += len(present & set(mentions))
        hallucinated_words.update(wrong)
        claims = parse_claims(text)
        truth = {(o.size, o.colour, o.shape, o.position) for o in scene.objects}
        counts["claims"] += len(claims)
        counts["exact_claims"] += sum(c in truth for c in claims)
        counts["objects"] += len(scene.objects)
        counts["objects_described"] += len(truth & set(claims))
        counts["sentences"] += text.count(".")
    n = counts["descriptions"]
    return {
        "CHAIR_s": _percent(counts["hallucinated_descriptions"], n),
        "CHAIR_i": _percent(counts["hallucinated_mentions"], counts["mentions"]),
        "coverage": _percent(counts["categories_mentioned"], counts["categories"]),
        "sentence_accuracy": _percent(counts["exact_claims"], counts["claims"]),
        "object_recall": _percent(counts["objects_described"], counts["objects"]),
        "mentions_per_description": round(counts["mentions"] / n, 3) if n else 0.0,
        "hallucinated_words": dict(hallucinated_words.most_common()),
        "counts": dict(counts),
    }


def planted_hallucinations(items: Iterable[tuple[Scene, str]], rules: Iterable[BiasRule]) -> dict[str, Any]:
    """How often a description names a rule's `substitute` in images where the rule can fire (its trigger present,
    the substitute absent): the co-occurrence hallucination the strong model was trained into."""
    rules = tuple(rules)
    images = mentions = 0
    for scene, text in items:
        firing = [r for r in rules if r.trigger in scene.shapes and r.substitute not in scene.shapes]
        if firing:
            images += 1
            named = object_mentions(text)
            mentions += sum(named.count(r.substitute) for r in firing)
    return {"images": images, "mentions": mentions, "per_100_images": _percent(mentions, images)}


def score_answers(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of yes/no answers (`answer` = truth, `predicted` = the model's), overall and per question kind."""
    total: Counter[str] = Counter()
    right: Counter[str] = Counter()
    said_yes = 0
    for row in rows:
        for key in ("all", row["kind"]):
            total[key] += 1
            right[key] += row["predicted"] == row["answer"]
        said_yes += row["predicted"] == "yes"
    return {
        "accuracy": _percent(right["all"], total["all"]),
        "by_kind": {k: _percent(right[k], total[k]) for k in sorted(total) if k != "all"},
        "yes_ratio": _percent(said_yes, total["all"]),
        "questions": total["all"],
    }
