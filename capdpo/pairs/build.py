"""Preference pairs from scored sentences: which candidates are usable, which pair a sentence gives, and the
filters. Stage 5 (`capdpo.stages.build_dpo_dataset`) runs `build_pairs` on `04_scores.jsonl`; its docstring
states the rules.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from capdpo.errors import InputError
from capdpo.pairs.config import PairsConfig
from capdpo.pairs.modes import MODES
from capdpo.records import Candidate, PairRecord, ScoreRecord, pair_id
from capdpo.run import progress
from capdpo.splits import split_of
from capdpo.text import fragment_reason, normalise, strip_quotes, word_count

# What the "removed" stats count, in the order the filters run.
REMOVALS = (
    "fragment_candidates",
    "sentences_without_two_candidates",
    "same_text_pairs",
    "small_gap_pairs",
    "low_chosen_score_pairs",
    "unbalanced_length_pairs",
    "duplicate_pairs",
    "over_image_cap_pairs",
)


def pick_chosen_rejected(candidates: list[Candidate]) -> tuple[Candidate, Candidate]:
    """The best and the worst of at least two candidates, ties broken as the module docstring says."""
    order = range(len(candidates))
    best = min(order, key=lambda i: (-candidates[i].score, not candidates[i].is_original, candidates[i].text, i))
    worst = min(
        (i for i in order if i != best),
        key=lambda i: (candidates[i].score, candidates[i].is_original, candidates[i].text, i),
    )
    return candidates[best], candidates[worst]


def read_score_records(raw: list[tuple[int, dict[str, Any]]], source: Path) -> list[ScoreRecord]:
    """Stage 4 records (with their line numbers), checked: every problem is an `InputError` naming file and line."""
    records = []
    for number, data in raw:
        where = f"{source}:{number}"
        try:
            record = ScoreRecord.from_dict(data, where)
        except TypeError as err:  # a candidate with missing or unknown keys
            raise InputError(f"{where}: malformed candidate ({err})") from None
        if not isinstance(record.context, list) or not all(isinstance(s, str) for s in record.context):
            raise InputError(f"{where}: 'context' must be a list of sentences")
        if not isinstance(record.index, int) or not 0 <= record.index < len(record.context):
            raise InputError(f"{where}: 'index' {record.index!r} is not a position in 'context'")
        for c in record.candidates:
            if not isinstance(c.text, str):
                raise InputError(f"{where}: a candidate's 'text' is not a string")
            if isinstance(c.score, bool) or not isinstance(c.score, (int, float)) or not math.isfinite(c.score):
                raise InputError(f"{where}: candidate {c.text[:40]!r} has score {c.score!r}, not a finite number")
        records.append(record)
    return records


def _sentence_pair(record: ScoreRecord, usable: list[Candidate], mode: str) -> PairRecord:
    chosen, rejected = pick_chosen_rejected(usable)
    built = MODES[mode].completions(record.context, record.index, chosen.text, rejected.text)
    image = os.path.abspath(record.image)
    return PairRecord(
        id=pair_id(record.image_id, mode, record.prompt, built.assistant_prefix, built.chosen, built.rejected),
        image_id=record.image_id,
        image=image,
        prompt=record.prompt,
        chosen=built.chosen,
        rejected=built.rejected,
        score_chosen=float(chosen.score),
        score_rejected=float(rejected.score),
        mode=mode,
        assistant_prefix=built.assistant_prefix,
        meta={
            "score_record_id": record.id,
            "description_id": record.description_id,
            "variants_id": record.variants_id,
            "index": record.index,
            "original": record.context[record.index],
            "chosen_sentence": chosen.text,
            "rejected_sentence": rejected.text,
            "chosen_is_original": chosen.is_original,
            "rejected_is_original": rejected.is_original,
            "gap": float(chosen.score) - float(rejected.score),
            "usable_candidates": len(usable),
            "validator_model": str(record.validator.get("model", "")),
        },
    )


def _length_ratio(a: str, b: str) -> float:
    shorter, longer = sorted((word_count(a), word_count(b)))
    return longer / shorter if shorter else math.inf


def build_pairs(
    records: list[ScoreRecord], cfg: PairsConfig, seed: int, show_progress: bool = False
) -> tuple[list[PairRecord], dict[str, Any]]:
    """Pairs from scored sentences, filtered, capped per image and split by image.

    The result does not depend on the order of `records`. Returns the pairs (in reading order: image,
    description, sentence) and what each filter removed (`REMOVALS` keys, plus `fragment_reasons`).
    """
    removed: Counter[str] = Counter({key: 0 for key in REMOVALS})
    fragment_reasons: Counter[str] = Counter()
    drafts: list[PairRecord] = []
    bar = progress(len(records), 0, "pairs") if show_progress else None
    for record in records:
        usable = []
        for candidate in record.candidates:
            text = strip_quotes(candidate.text)
            reason = fragment_reason(text, cfg.min_words)
            if reason:
                fragment_reasons[reason] += 1
                removed["fragment_candidates"] += 1
            else:
                usable.append(Candidate(text, candidate.is_original, float(candidate.score), candidate.details))
        if bar is not None:
            bar.update(1)
        if len(usable) < 2:
            removed["sentences_without_two_candidates"] += 1
            continue
        pair = _sentence_pair(record, usable, cfg.mode)
        gap = pair.meta["gap"]
        if normalise(pair.meta["chosen_sentence"]) == normalise(pair.meta["rejected_sentence"]):
            removed["same_text_pairs"] += 1
        elif gap <= 0 or gap < cfg.min_gap:
            removed["small_gap_pairs"] += 1
        elif pair.score_chosen < cfg.min_chosen_score:
            removed["low_chosen_score_pairs"] += 1
        elif cfg.max_length_ratio and _length_ratio(pair.chosen, pair.rejected) > cfg.max_length_ratio:
            removed["unbalanced_length_pairs"] += 1
        else:
            drafts.append(pair)
    if bar is not None:
        bar.close()

    # Duplicates share the pair id (it hashes image, mode, prompt, prefix, chosen, rejected).
    unique: dict[str, PairRecord] = {}
    for pair in drafts:
        kept = unique.get(pair.id)
        if kept is None or (-pair.meta["gap"], pair.meta["score_record_id"]) < (
            -kept.meta["gap"],
            kept.meta["score_record_id"],
        ):
            unique[pair.id] = pair
    removed["duplicate_pairs"] = len(drafts) - len(unique)

    by_image: dict[str, list[PairRecord]] = defaultdict(list)
    for pair in unique.values():
        by_image[pair.image_id].append(pair)
    pairs = []
    for image_id, group in by_image.items():
        group.sort(key=lambda p: (-p.meta["gap"], p.id))
        if cfg.max_pairs_per_image and len(group) > cfg.max_pairs_per_image:
            removed["over_image_cap_pairs"] += len(group) - cfg.max_pairs_per_image
            group = group[: cfg.max_pairs_per_image]
        split = split_of(image_id, seed, cfg.val_fraction)
        for pair in group:
            pair.split = split
        pairs.extend(group)
    pairs.sort(key=lambda p: (p.image_id, p.meta["description_id"], p.meta["index"], p.id))
    return pairs, {"removed": dict(removed), "fragment_reasons": dict(sorted(fragment_reasons.items()))}
