"""Sentence splitting and the cleaning of model-written sentences."""

from __future__ import annotations

import re
from functools import lru_cache

_TERMINAL = (".", "!", "?", '"', "'", ")", "”", "’", "…")
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course)[,!.]?\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is)\b[^:\n]*:|"
    r"(?:the\s+)?(?:rewritten|revised|corrected|new|modified|improved)\s+(?:sentence|version|description)[^:\n]*:|"
    r"(?:rewrite|answer|sentence|output)\s*:)\s*",
    re.IGNORECASE,
)
_POLITE_ONLY = re.compile(r"^\s*(?:sure|certainly|okay|ok|of course)[,!.]\s*", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·]+|\(?\d{1,2}[.)]|\(?[a-zA-Z][.)])\s+")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}


@lru_cache(maxsize=4)
def _segmenter(language: str = "en"):
    import pysbd

    # clean=False keeps the text exactly as written, so a sentence can be found and replaced in its description
    return pysbd.Segmenter(language=language, clean=False)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (rule-based, offline); whitespace-only pieces are dropped."""
    text = text.strip()
    if not text:
        return []
    pieces = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d{1,2}[.)])\s)", text):
        pieces.extend(s.strip() for s in _segmenter().segment(paragraph))
    return [p for p in pieces if re.search(r"\w", p)]  # a lone "." or "-" is no sentence


def is_complete_sentence(sentence: str) -> bool:
    """Whether a sentence ends like a finished one (terminal punctuation, optionally inside quotes/brackets)."""
    return sentence.rstrip().endswith(_TERMINAL)


def description_sentences(text: str, finish_reason: str) -> tuple[list[str], str]:
    """Sentences of a description, and the last one if the token limit cut it off ("" otherwise).

    Only a description stopped by the token limit (`finish_reason == "length"`) can end in a cut sentence, and
    only when that sentence lacks terminal punctuation: a complete last sentence is kept.
    """
    sentences = split_sentences(text)
    if finish_reason == "length" and sentences and not is_complete_sentence(sentences[-1]):
        return sentences[:-1], sentences[-1]
    return sentences, ""


def strip_quotes(text: str) -> str:
    """Remove matching quotes around the whole text (repeatedly)."""
    text = text.strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        text = text[1:-1].strip()
    return text


def clean_variant(raw: str) -> str:
    """Turn a model's rewrite into one bare sentence.

    Drops "Sure, here is the rewritten sentence:"-style preambles, list markers, surrounding quotes and any text
    after the first sentence (a variant replaces exactly one sentence of a description). Returns "" when
    nothing usable is left.
    """
    text = raw.strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # a preamble line alone ("Here is the rewritten sentence:") is followed by the answer on the next line
    while lines and (_PREAMBLE.fullmatch(lines[0].strip() + " ") or lines[0].strip().endswith(":")):
        lines = lines[1:]
    text = lines[0] if lines else ""
    for _ in range(3):
        before = text
        text = _PREAMBLE.sub("", text, count=1)
        text = _POLITE_ONLY.sub("", text, count=1) if _POLITE_ONLY.match(text) and len(text.split()) > 3 else text
        text = _LIST_MARKER.sub("", text, count=1)
        text = strip_quotes(text)
        if text == before:
            break
    sentences = split_sentences(text)
    return strip_quotes(sentences[0]) if sentences else ""


def normalise(text: str) -> str:
    """Comparison key: lower case, single spaces, no surrounding quotes or trailing punctuation."""
    text = strip_quotes(text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".!?;:,").strip()


def word_count(text: str) -> int:
    return len(re.findall(r"\w+(?:['’-]\w+)*", text))


# ---- stage 3: rewriting sentences ------------------------------------------------------------------------
FIRST_SENTENCE_CONTEXT = "(nothing yet: this is the first sentence)"


def rewrite_prompt(template: str, context: list[str], index: int) -> str:
    """The rewrite instruction for sentence `index` given the sentences before it."""
    before = " ".join(context[:index]) or FIRST_SENTENCE_CONTEXT
    return template.replace("{context}", before).replace("{sentence}", context[index])


# Words whose presence or absence does not change what a sentence claims about an image. Negations, numbers,
# prepositions and every content word stay: "on" vs "under" and "a" vs "no" are different claims.
_FUNCTION_WORDS = frozenset(
    "a an the this that these those it its is are was were be been being there here also very quite just "
    "and which who whose".split()
)
# A candidate that is nothing but a list marker: "-", "*", "•", "2.", "3)", "(b)", "iv."
_BARE_LIST_MARKER = re.compile(r"[-*•·–—]+|\(?(?:\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,6})[.)]")


def content_key(text: str) -> tuple[str, ...]:
    """What a sentence says, for telling rewrites apart: its words in order, lower case, without punctuation and
    function words ("There is a red circle." and "A red circle." say the same; "a red circle" and "no red circle"
    do not)."""
    return tuple(w for w in re.findall(r"\w+(?:['’-]\w+)*", strip_quotes(text).lower()) if w not in _FUNCTION_WORDS)


def fragment_reason(text: str, min_words: int) -> str | None:
    """Why a candidate is a fragment (`list_marker`, `list_header`, `too_few_words`), or None if it is usable."""
    body = strip_quotes(text)
    if not body or _BARE_LIST_MARKER.fullmatch(body):
        return "list_marker"
    if body.endswith(":"):
        return "list_header"
    if word_count(body) < min_words:
        return "too_few_words"
    return None


def dedupe_variants(original: str, variants: list[str], seen: set[tuple[str, ...]] | None = None) -> list[str]:
    """Drop empty variants, repeats and copies of the original: two sentences are the same when they share their
    `content_key` (case, punctuation and function words aside). `seen` (updated) holds keys already taken, e.g.
    by an earlier round's variants."""
    seen = seen if seen is not None else set()
    seen.add(content_key(original))
    kept = []
    for variant in variants:
        key = content_key(variant)
        if key and key not in seen:
            seen.add(key)
            kept.append(variant)
    return kept
