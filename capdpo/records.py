"""One dataclass per stage record: the data contracts between stages (see the README's "Records")."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from capdpo.errors import InputError
from capdpo.jsonl import stable_id

R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """Base: conversion to and from the dicts stored one per JSONL line."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any], where: str = "") -> R:
        """Build from a stored dict; missing required fields are an `InputError` naming `where`."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise InputError(f"{where or cls.__name__}: missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        if "candidates" in kwargs and typing.get_type_hints(cls).get("candidates") == list[Candidate]:
            kwargs["candidates"] = [c if isinstance(c, Candidate) else Candidate(**c) for c in kwargs["candidates"]]
        return cls(**kwargs)


@dataclass
class ImageRecord(Record):
    """01_images: one image."""

    id: str  # content hash (first 20 hex digits of sha256)
    path: str  # absolute path of a readable image file
    sha256: str
    width: int  # after EXIF orientation
    height: int
    source: str  # folder / coco / hf
    source_id: str | None = None  # e.g. the COCO image id, or the dataset row
    objects: list[str] = field(default_factory=list)  # COCO categories annotated on the image (for CHAIR)
    captions: list[str] = field(default_factory=list)  # reference captions, where the source has them


@dataclass
class DescriptionRecord(Record):
    """02_descriptions: one sampled description of one image."""

    id: str
    image_id: str
    image: str  # path
    prompt: str
    text: str
    sentences: list[str]
    model: str
    generation: dict[str, Any]  # sampling parameters, seed, sample index
    finish_reason: str = "stop"  # "stop" (end of turn) or "length" (cut by max_new_tokens)
    dropped_tail: str = ""  # the last sentence, when it was cut off by the token limit


@dataclass
class VariantRecord(Record):
    """03_variants: one sentence of a description and its rewrites."""

    id: str
    image_id: str
    image: str
    description_id: str
    prompt: str  # the description prompt the sentence answers
    index: int  # position of the sentence in the description
    sentence: str
    context: list[str]  # the description's sentences, in order (the sentence is context[index])
    variants: list[str]  # cleaned, non-empty, distinct, none equal to the original
    generation: dict[str, Any]
    model: str = ""
    raw_variants: list[str] = field(default_factory=list)  # what the model wrote before cleaning, every round
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: temperature, samples, variants added


@dataclass
class Candidate(Record):
    """A candidate sentence and its score (1 = accurate)."""

    text: str
    is_original: bool
    score: float
    details: dict[str, Any] = field(default_factory=dict)  # per-method scores and raw probabilities


@dataclass
class ScoreRecord(Record):
    """04_scores: the scored candidates of one sentence."""

    id: str
    image_id: str
    image: str
    variants_id: str
    description_id: str
    prompt: str
    index: int
    context: list[str]
    candidates: list[Candidate]
    validator: dict[str, Any]  # model, methods, weights, prompts


@dataclass
class PairRecord(Record):
    """05_pairs: one preference pair."""

    id: str
    image_id: str
    image: str
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float
    mode: str  # context / sentence
    split: str = "train"  # train / val
    assistant_prefix: str = ""  # sentence mode: the description before the sentence, part of the prompt
    meta: dict[str, Any] = field(default_factory=dict)
    rejected_image: str = ""  # mdpo: the image the chosen answer must fit worse (none: a corruption of `image`)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.rejected_image:  # records without one keep the fields they always had
            del data["rejected_image"]
        return data


def pair_id(image_id: str, mode: str, prompt: str, assistant_prefix: str, chosen: str, rejected: str) -> str:
    """The id of a pair: a stable hash of everything that defines it (duplicates share it)."""
    return stable_id("pair", image_id, mode, prompt, assistant_prefix, chosen, rejected)
