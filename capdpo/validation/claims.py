"""Claim decomposition for the `claims` validation method: a sentence becomes atomic yes/no questions.

A sentence states objects, their counts, attributes (colour, size, material, ...), positions in the image and
relations between objects. Each of these is one claim, asked as a yes/no question about the image ("Is there a red
triangle in the image?"); `capdpo.validation.methods.Claims` has the weak model answer each one.

Two decomposers: a model (the strong model by default, any local model, or an OpenAI-compatible endpoint) asked to
write one question per line, and `rule_claims`, which needs no model and reads noun phrases, numbers, attribute
words, positions and relation phrases from word lists. A model's answer with no usable question falls back to the
rules, so every sentence gets claims.

Decompositions are cached per sentence in `04_scores.claims.jsonl` (one file per rank under `torchrun`), keyed by
the sentence and everything the decomposition depends on (decomposer, prompt, limits); a rerun after a crash reads
the cache and decomposes only what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capdpo.jsonl import JsonlAppender, iter_jsonl, stable_id

if TYPE_CHECKING:
    from capdpo.validation.config import ValidateConfig

NUMBERS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    **{str(n): n for n in range(2, 21)},
}
COLOURS = (
    "red green blue yellow purple orange pink brown black white gray grey silver gold beige violet cyan magenta "
    "turquoise teal navy maroon tan"
).split()
SIZES = "small large big tiny little huge giant tall short long wide narrow thin thick".split()
OTHER_ATTRIBUTES = (
    "wooden metal metallic plastic glass striped spotted dotted round square rectangular triangular empty full "
    "open closed old new young wet dry dark bright shiny"
).split()
ATTRIBUTES = set(COLOURS) | set(SIZES) | set(OTHER_ATTRIBUTES)
POSITIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "upper left",
    "upper right",
    "lower left",
    "lower right",
    "center",
    "centre",
    "middle",
    "top",
    "bottom",
    "left",
    "right",
    "foreground",
    "background",
)
# longest first, so "to the left of" wins over "left"
RELATIONS = (
    "to the left of",
    "to the right of",
    "in front of",
    "on top of",
    "next to",
    "close to",
    "far from",
    "on the left of",
    "on the right of",
    "beside",
    "above",
    "below",
    "under",
    "underneath",
    "behind",
    "near",
    "inside",
    "between",
    "on",
    "in",
    "with",
    "holding",
)
DETERMINERS = {"a", "an", "the", "one", "some", "several", "many", "another", "its", "their", "his", "her"}
# words that end a noun phrase or are never its noun
_NOT_NOUNS = {
    "there",
    "is",
    "are",
    "was",
    "were",
    "be",
    "and",
    "or",
    "of",
    "at",
    "to",
    "it",
    "this",
    "that",
    "which",
    "who",
    "image",
    "picture",
    "photo",
    "scene",
    "side",
    "corner",
    "part",
    "each",
    "other",
    "also",
    "both",
}
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def singular(noun: str) -> str:
    """A plural noun's singular by the common English endings (boxes -> box, crosses -> cross, stars -> star)."""
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("sses", "shes", "ches", "xes", "zes")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith(("ss", "us", "is")):
        return noun[:-1]
    return noun


def plural(noun: str) -> str:
    """The plural of a singular noun (box -> boxes, star -> stars, berry -> berries)."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + "s"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class _Phrase:
    """A noun phrase found in a sentence: its noun (singular), count, attribute words, and where it ends."""

    def __init__(self, noun: str, count: int, attributes: list[str], end: int) -> None:
        self.noun, self.count, self.attributes, self.end = noun, count, attributes, end

    def named(self, with_attributes: bool = False) -> str:
        words = [*(self.attributes if with_attributes else []), self.noun]
        return f"{_article(words[0])} {' '.join(words)}"


def _phrase_at(words: list[str], i: int) -> _Phrase | None:
    """The noun phrase that starts at word `i` with a determiner or number, or None."""
    j, count = i, 0
    while j < len(words) and (words[j] in DETERMINERS or words[j] in NUMBERS):  # "a", "the two"
        count = max(count, NUMBERS.get(words[j], 1))
        j += 1
    if j == i:
        return None
    attributes = []
    while j < len(words) and words[j] in ATTRIBUTES:
        attributes.append(words[j])
        j += 1
    ends = j >= len(words) or words[j] in _NOT_NOUNS or _relation_at(words, j) is not None
    if ends and attributes and attributes[-1] not in COLOURS:  # "a small square": the last word is the noun
        attributes.pop()
        j -= 1
    elif ends:
        return None
    noun = singular(words[j]) if count > 1 else words[j]
    return _Phrase(noun, count, attributes, j + 1)


def _relation_at(words: list[str], i: int) -> str | None:
    return next((r for r in RELATIONS if words[i : i + len(r.split())] == r.split()), None)


def rule_claims(sentence: str, max_claims: int = 0) -> list[dict[str, str]]:
    """Atomic claims of a sentence as yes/no questions, from word lists alone (no model).

    Every noun phrase that starts with a determiner or a number gives an object claim ("Is there a triangle in the
    image?", or for a count of two or more "Are there two circles in the image?"), one attribute claim per attribute
    word ("Is there a red triangle in the image?"), a position claim where "at/in/on the <position>" follows it,
    and a relation claim where a relation phrase joins it to the next noun phrase ("Is there a triangle next to a
    circle?"). A sentence with no noun phrase is one claim: itself.

    Args:
        sentence: the sentence.
        max_claims: keep at most this many claims (0: all).

    Returns:
        [{"kind": object | count | attribute | position | relation | sentence, "question": ...}, ...]
    """
    words = _WORD.findall(sentence.lower())
    claims: list[dict[str, str]] = []

    def add(kind: str, question: str) -> None:
        if all(c["question"] != question for c in claims):
            claims.append({"kind": kind, "question": question})

    i = 0
    previous: _Phrase | None = None
    relation_before: str | None = None
    while i < len(words):
        phrase = _phrase_at(words, i)
        if phrase is None:
            relation = _relation_at(words, i)
            position = _position_at(words, i)
            if position and previous is not None:
                add("position", f"Is there {previous.named()} at the {position} of the image?")
                i += len(position.split()) + 2
                continue
            if (
                words[i] in ("is", "are")
                and previous is not None
                and words[i + 1 : i + 2]
                and words[i + 1] in ATTRIBUTES
            ):
                i += 1
                while i < len(words) and (words[i] in ATTRIBUTES or words[i] == "and"):
                    if words[i] != "and":
                        add("attribute", _attribute_question(previous, words[i]))
                    i += 1
                continue
            if relation is not None and previous is not None:
                relation_before = relation
                i += len(relation.split())
                continue
            i += 1
            continue
        if phrase.count > 1:
            add("count", f"Are there {_count_word(phrase.count)} {plural(phrase.noun)} in the image?")
        else:
            add("object", f"Is there {phrase.named()} in the image?")
        for attribute in phrase.attributes:
            add("attribute", _attribute_question(phrase, attribute))
        if previous is not None and relation_before is not None:
            add("relation", f"Is there {previous.named()} {relation_before} {phrase.named()}?")
        previous, relation_before = phrase, None
        i = phrase.end
    if not claims:
        text = sentence.strip()
        return [{"kind": "sentence", "question": f"Is it true that {text[:1].lower()}{text[1:].rstrip('.')}?"}]
    return claims[:max_claims] if max_claims else claims


def _attribute_question(phrase: _Phrase, attribute: str) -> str:
    if phrase.count > 1:
        return f"Are there {attribute} {plural(phrase.noun)} in the image?"
    return f"Is there {_article(attribute)} {attribute} {phrase.noun} in the image?"


def _position_at(words: list[str], i: int) -> str | None:
    """A position phrase "at/in/on the <position>" starting at word `i` (the position's words), or None."""
    if words[i] not in ("at", "in", "on") or i + 1 >= len(words) or words[i + 1] != "the":
        return None
    for position in POSITIONS:
        parts = position.split()
        if words[i + 2 : i + 2 + len(parts)] == parts:
            following = words[i + 2 + len(parts) : i + 3 + len(parts)]
            if following in (["of"], ["side"]) and position in ("left", "right", "top", "bottom"):
                return None  # "on the left of X" is a relation, "on the left side" too vague to ask
            return position
    return None


def _count_word(n: int) -> str:
    names = {v: k for k, v in NUMBERS.items() if not k.isdigit()}
    return names.get(n, str(n))


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[a-z][.)]|q\d*[:.])\s*", re.IGNORECASE)


def parse_model_claims(text: str, max_claims: int = 0) -> list[dict[str, str]]:
    """The yes/no questions of a decomposer model's answer: one per line ending in '?', bullets and numbering
    removed, repeats dropped."""
    claims: list[dict[str, str]] = []
    for line in text.splitlines():
        question = _BULLET.sub("", line).strip().strip('"').strip()
        if len(question) < 6 or not question.endswith("?") or len(question.split()) < 3:
            continue
        question = question[0].upper() + question[1:]
        if all(c["question"] != question for c in claims):
            claims.append({"kind": "claim", "question": question})
    return claims[:max_claims] if max_claims else claims


class ClaimCache:
    """Sentence -> claims, read from every claims file of the run directory and appended to this rank's file."""

    def __init__(self, run_dir: Path, rank: int = 0, world: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ("04_scores.claims.jsonl" if world == 1 else f"04_scores.claims.rank{rank}.jsonl")
        self.records: dict[str, dict[str, Any]] = {}
        for path in sorted(self.run_dir.glob("04_scores.claims*.jsonl")):
            for record in iter_jsonl(path, allow_torn_tail=True):
                self.records[record["id"]] = record

    def appender(self) -> JsonlAppender:
        return JsonlAppender(self.path)


class Decomposer:
    """Turns sentences into claims with the configured decomposer, through the cache.

    Args:
        cfg: the `validate` section (claims_* settings).
        identity: how records name the decomposer ("rules", or the model's id).
        backend: a generation backend for a model decomposer (None for "rules"; opened lazily by `open_backend`).
    """

    def __init__(self, cfg: ValidateConfig, identity: str, open_backend: Any = None) -> None:
        self.cfg = cfg
        self.identity = identity
        self.open_backend = open_backend
        self.settings = {
            "decomposer": identity,
            "max_claims": cfg.claims_max,
            **({"prompt": cfg.claims_decompose_prompt, "tokens": cfg.claims_max_new_tokens} if open_backend else {}),
        }

    def key(self, sentence: str) -> str:
        return stable_id("claims", sentence, self.settings)

    def missing(self, cache: ClaimCache, sentences: Iterable[str]) -> list[str]:
        return sorted({s for s in sentences if self.key(s) not in cache.records})

    def fill(self, cache: ClaimCache, sentences: Iterable[str], batch_size: int) -> int:
        """Decompose every sentence the cache lacks, appending each batch as it finishes; returns how many."""
        todo = self.missing(cache, sentences)
        if not todo:
            return 0
        backend = self.open_backend() if self.open_backend is not None else None
        with cache.appender() as out:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                records = self._decompose(backend, batch)
                out.write(records)
                for record in records:
                    cache.records[record["id"]] = record
        return len(todo)

    def _decompose(self, backend: Any, sentences: list[str]) -> list[dict[str, Any]]:
        raw: dict[str, str] = {}
        if backend is not None:
            from capdpo.generation.batching import Request, user_message
            from capdpo.generation.sampling import Generation

            requests = [
                Request(
                    key=self.key(s),
                    image=None,
                    messages=[user_message(self.cfg.claims_decompose_prompt.replace("{sentence}", s), False)],
                )
                for s in sentences
            ]
            gen = Generation(max_new_tokens=self.cfg.claims_max_new_tokens, temperature=0.0)
            raw = {o.key: o.text for o in backend.generate(requests, gen)}
        records = []
        for s in sentences:
            key = self.key(s)
            claims = parse_model_claims(raw[key], self.cfg.claims_max) if key in raw else []
            source = "model" if claims else "rules"
            claims = claims or rule_claims(s, self.cfg.claims_max)
            record = {"id": key, "sentence": s, "claims": claims, "source": source, "decomposer": self.identity}
            if key in raw:
                record["raw"] = raw[key]
            records.append(record)
        return records

    def claims_of(self, cache: ClaimCache, sentence: str) -> list[dict[str, str]]:
        return cache.records[self.key(sentence)]["claims"]
