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


def dedupe_variants(original: str, variants: list[str]) -> list[str]:
    """Drop empty variants, repeats and copies of the original (compared case- and punctuation-insensitively)."""
    seen = {normalise(original)}
    kept = []
    for variant in variants:
        key = normalise(variant)
        if key and key not in seen:
            seen.add(key)
            kept.append(variant)
    return kept
