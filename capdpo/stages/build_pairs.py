"""Stage 5: preference pairs from the scored candidates, split by image, exported for other trainers.

    python 5_build_dpo_dataset.py --config configs/demo.yaml [--mode sentence --min_gap 0.2 ...]

Reads `04_scores.jsonl` (refusing an unfinished one unless --allow_partial) and rebuilds `05_pairs.jsonl` and
`05_exports/` whole on every run: the stage is pure Python and takes seconds, and nothing is replaced before the
input has been read and checked in full.

From each scored sentence at most one pair is made:

1. Fragments are never chosen or rejected: after stripping surrounding quotes, a candidate that is a bare list
   marker ("2.", "-"), a list header (ends with ':') or shorter than `min_words` words is left out.
2. chosen = the highest-scoring candidate left, rejected = the lowest of the others. Ties are broken the same
   way every run: for chosen the original sentence wins (it is the strong model's own wording, the text the
   policy actually produces), then the alphabetically first text; for rejected a rewrite wins over the original
   (an original is never rejected in favour of an equally scored rewrite), then the alphabetically first text.
3. `context` mode (default): chosen/rejected are the whole description with the sentence replaced by the chosen
   / rejected candidate, so the completion answers the description prompt. `sentence` mode: the sentences before
   it are `assistant_prefix` (the start of the answer, part of the prompt) and the completions are single
   sentences.

Then, in this order, each counted in the stats: pairs whose two sentences are the same text up to case,
whitespace and trailing punctuation; pairs whose score gap is below `min_gap` (or zero); pairs whose chosen
sentence scores below `min_chosen_score`; with `max_length_ratio`,
pairs whose longer completion has more than ratio x the words of the shorter; duplicates (same image, prompt,
prefix, chosen and rejected: the one with the larger gap stays); beyond `max_pairs_per_image`, the pairs of an
image with the smallest gaps (ties: lower pair id stays). Images, never single pairs, go to the validation split:
a stable hash of (seed, image id) below `val_fraction`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig, PairsConfig, load_config
from capdpo.errors import InputError
from capdpo.exports import pair_id, write_exports
from capdpo.jsonl import stable_id, write_jsonl
from capdpo.records import Candidate, PairRecord, ScoreRecord
from capdpo.run import STAGE_FILES, Stage, progress
from capdpo.text import normalise, strip_quotes, word_count

EXPORT_DIR = "05_exports"
# A candidate that is nothing but a list marker: "-", "*", "•", "2.", "3)", "(b)", "iv."
_BARE_LIST_MARKER = re.compile(r"[-*•·–—]+|\(?(?:\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,6})[.)]")
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


def pick_chosen_rejected(candidates: list[Candidate]) -> tuple[Candidate, Candidate]:
    """The best and the worst of at least two candidates, ties broken as the module docstring says."""
    order = range(len(candidates))
    best = min(order, key=lambda i: (-candidates[i].score, not candidates[i].is_original, candidates[i].text, i))
    worst = min(
        (i for i in order if i != best),
        key=lambda i: (candidates[i].score, candidates[i].is_original, candidates[i].text, i),
    )
    return candidates[best], candidates[worst]


def split_of(image_id: str, seed: int, val_fraction: float) -> str:
    """`val` for a stable, seeded share `val_fraction` of images, `train` for the rest."""
    position = int(stable_id("split", seed, image_id), 16) / 16**20  # uniform in [0, 1)
    return "val" if position < val_fraction else "train"


def read_score_records(raw: list[dict[str, Any]], source: Path) -> list[ScoreRecord]:
    """Stage 4 records, checked: every problem is an `InputError` naming the file and record."""
    records = []
    for number, data in enumerate(raw, start=1):
        where = f"{source} record {number}"
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
    before, after = record.context[: record.index], record.context[record.index + 1 :]
    if mode == "context":
        prefix = ""
        chosen_text = " ".join([*before, chosen.text, *after])
        rejected_text = " ".join([*before, rejected.text, *after])
    else:
        prefix = " ".join(before)
        chosen_text, rejected_text = chosen.text, rejected.text
    image = os.path.abspath(record.image)
    return PairRecord(
        id=pair_id(record.image_id, mode, record.prompt, prefix, chosen_text, rejected_text),
        image_id=record.image_id,
        image=image,
        prompt=record.prompt,
        chosen=chosen_text,
        rejected=rejected_text,
        score_chosen=float(chosen.score),
        score_rejected=float(rejected.score),
        mode=mode,
        assistant_prefix=prefix,
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


def _replace_exports(pairs: list[PairRecord], cfg: PairsConfig, run_dir: Path) -> dict[str, list[str]]:
    """Write the exports into a fresh folder, then swap it in: no stale file of an earlier run survives."""
    final, tmp, old = run_dir / EXPORT_DIR, run_dir / f"{EXPORT_DIR}.tmp", run_dir / f"{EXPORT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = write_exports(pairs, tmp, cfg.exports, cfg.dataset_name)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return written


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Build `05_pairs.jsonl` and `05_exports/` from stage 4's scores; return the stats."""
    sec: PairsConfig = cfg.section
    stage = Stage("pairs", cfg)
    source = stage.run_dir / STAGE_FILES["validate"]
    partial = not source.with_name(source.name.removesuffix(".jsonl") + ".done").exists()
    # Read and check everything before any output is touched: bad input never costs finished work.
    records = read_score_records(stage.read_input("validate"), source)
    pairs, filtered = build_pairs(records, sec, cfg.common.seed, show_progress=True)

    stage.done_path.unlink(missing_ok=True)
    stage.write_meta()
    write_jsonl(stage.output, (p.to_dict() for p in pairs))
    exports = _replace_exports(pairs, sec, stage.run_dir)

    splits = Counter(p.split for p in pairs)
    image_splits = {split: len({p.image_id for p in pairs if p.split == split}) for split in sorted(splits)}
    missing_images = sorted({p.image for p in pairs if not os.path.exists(p.image)})
    gaps = [p.meta["gap"] for p in pairs]
    removed = filtered["removed"]
    stats = {
        "mode": sec.mode,
        "input_partial": partial,
        "sentences": len(records),
        "candidates": sum(len(r.candidates) for r in records),
        "images_in": len({r.image_id for r in records}),
        **filtered,
        "pairs": len(pairs),
        "pairs_by_split": dict(sorted(splits.items())),
        "images_by_split": image_splits,
        "mean_gap": sum(gaps) / len(gaps) if gaps else 0.0,
        "missing_images": len(missing_images),
        "exports": exports,
    }
    summary = (
        f"{len(records)} scored sentences of {stats['images_in']} images gave {len(pairs)} {sec.mode}-mode pairs "
        f"({splits.get('train', 0)} train / {splits.get('val', 0)} validation, split by image; mean score gap "
        f"{stats['mean_gap']:.3f}). Removed: {removed['fragment_candidates']} fragment candidates, "
        f"{removed['sentences_without_two_candidates']} sentences without two usable candidates, "
        f"{removed['same_text_pairs']} same-text pairs, {removed['small_gap_pairs']} pairs with a gap below "
        f"{sec.min_gap}, {removed['low_chosen_score_pairs']} with a chosen score below {sec.min_chosen_score}, "
        f"{removed['unbalanced_length_pairs']} length-unbalanced, {removed['duplicate_pairs']} "
        f"duplicates, {removed['over_image_cap_pairs']} over the cap of {sec.max_pairs_per_image} per image."
        + (f" Exports ({', '.join(sec.exports)}) in {stage.run_dir / EXPORT_DIR}." if sec.exports else "")
        + (" The input stage had not finished (--allow_partial)." if partial else "")
        + (
            f" Warning: {len(missing_images)} image file(s) not found, e.g. {missing_images[0]}."
            if missing_images
            else ""
        )
        + (" No pairs: lower min_gap or check the scores." if records and not pairs else "")
    )
    return stage.finish(stats, summary)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("pairs", a, __doc__)), argv)
