"""Stage 5 end to end on hand-built stage-4 records: which pairs come out, and why."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from capdpo.errors import ConfigError, InputError
from capdpo.formats.registry import import_file
from capdpo.jsonl import read_json, read_jsonl, stable_id
from capdpo.records import PairRecord
from capdpo.sections import load_config
from capdpo.stages.build_dpo_dataset import run
from capdpo.text import fragment_reason
from tests.helpers import run_script

PROMPT = "Describe this image in detail."
CONTEXT = [
    "A red ball lies on the grass.",
    "A brown dog sits next to it.",
    "The sky is clear and blue.",
]


def score_record(
    image_id: str,
    index: int,
    candidates: list[tuple[str, float, bool]],
    *,
    context: list[str] | None = None,
    description_id: str = "d1",
    image: str = "/data/images/x.jpg",
) -> dict[str, Any]:
    """A 04_scores record; `candidates` are (text, score, is_original)."""
    context = list(context or CONTEXT)
    return {
        "id": stable_id("score", image_id, description_id, index),
        "image_id": image_id,
        "image": image,
        "variants_id": stable_id("variants", image_id, description_id, index),
        "description_id": description_id,
        "prompt": PROMPT,
        "index": index,
        "context": context,
        "candidates": [{"text": t, "is_original": o, "score": s, "details": {"yesno": s}} for t, s, o in candidates],
        "validator": {"model": "weak", "methods": ["yesno"]},
    }


def write_run(tmp_path: Path, records: list[dict[str, Any]], done: bool = True, **pairs: Any) -> Path:
    """A run dir holding a finished (or not) 04_scores.jsonl, and a config file for it; returns the config."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "04_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    done_path = run_dir / "04_scores.done"
    if done:
        done_path.write_text("{}\n")
    else:
        done_path.unlink(missing_ok=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "seed": 0, "pairs": {"val_fraction": 0.0, **pairs}}))
    return config


def build(tmp_path: Path, records: list[dict[str, Any]], *args: str, **pairs: Any) -> tuple[list[PairRecord], dict]:
    config = write_run(tmp_path, records, **pairs)
    stats = run(load_config("pairs", ["--config", str(config), *args]))
    pairs_out = [PairRecord.from_dict(r) for r in read_jsonl(tmp_path / "run" / "05_pairs.jsonl")]
    return pairs_out, stats


# ---- modes -------------------------------------------------------------------------------------------------------
THREE = [
    ("A brown dog sits next to it.", 0.6, True),
    ("A black cat sits next to it.", 0.1, False),
    ("A brown dog sits beside the ball.", 0.9, False),
]


def test_context_mode_replaces_the_sentence_in_the_whole_description(tmp_path: Path) -> None:
    pairs, stats = build(tmp_path, [score_record("img1", 1, THREE)])
    assert len(pairs) == 1
    p = pairs[0]
    assert p.mode == "context" and p.prompt == PROMPT and p.assistant_prefix == ""
    assert p.chosen == "A red ball lies on the grass. A brown dog sits beside the ball. The sky is clear and blue."
    assert p.rejected == "A red ball lies on the grass. A black cat sits next to it. The sky is clear and blue."
    assert (p.score_chosen, p.score_rejected) == (0.9, 0.1)
    assert p.image_id == "img1" and p.image == "/data/images/x.jpg" and p.split == "train"
    assert p.meta["chosen_sentence"] == "A brown dog sits beside the ball."
    assert p.meta["rejected_sentence"] == "A black cat sits next to it."
    assert p.meta["original"] == CONTEXT[1]
    assert p.meta["index"] == 1 and p.meta["description_id"] == "d1"
    assert p.meta["gap"] == pytest.approx(0.8)
    assert not p.meta["chosen_is_original"] and not p.meta["rejected_is_original"]
    assert stats["pairs"] == 1 and stats["sentences"] == 1 and stats["candidates"] == 3
    assert all(v == 0 for v in stats["removed"].values())
    assert (tmp_path / "run" / "05_pairs.done").exists()


def test_sentence_mode_puts_earlier_sentences_in_the_assistant_prefix(tmp_path: Path) -> None:
    first = [("A red ball lies on the grass.", 0.3, True), ("A green ball lies on the grass.", 0.8, False)]
    pairs, _ = build(tmp_path, [score_record("img1", 0, first), score_record("img1", 2, THREE)], mode="sentence")
    by_index = {p.meta["index"]: p for p in pairs}
    assert by_index[0].assistant_prefix == ""
    assert (by_index[0].chosen, by_index[0].rejected) == (
        "A green ball lies on the grass.",
        "A red ball lies on the grass.",
    )
    # the context of index 2 is the two sentences before it, joined with single spaces
    assert by_index[2].assistant_prefix == "A red ball lies on the grass. A brown dog sits next to it."
    assert by_index[2].chosen == "A brown dog sits beside the ball."
    assert by_index[2].rejected == "A black cat sits next to it."
    assert all(p.mode == "sentence" and p.prompt == PROMPT for p in pairs)


def test_ties_prefer_the_original_as_chosen_and_a_rewrite_as_rejected(tmp_path: Path) -> None:
    top_tie = [
        ("Zebras graze in a field.", 0.8, False),
        ("A horse grazes in a field.", 0.8, True),
        ("A cow sleeps here now.", 0.1, False),
    ]
    low_tie = [
        ("A horse grazes in a field.", 0.2, True),
        ("Zebras graze in a field.", 0.2, False),
        ("Two horses graze there.", 0.9, False),
    ]
    records = [score_record("a", 0, top_tie), score_record("b", 0, low_tie)]
    pairs, _ = build(tmp_path, records, mode="sentence")
    by_image = {p.image_id: p for p in pairs}
    assert by_image["a"].chosen == "A horse grazes in a field." and by_image["a"].meta["chosen_is_original"]
    assert by_image["b"].rejected == "Zebras graze in a field." and not by_image["b"].meta["rejected_is_original"]
    # the candidates' order in the record does not matter
    for r in records:
        r["candidates"].reverse()
    again, _ = build(tmp_path, records, mode="sentence")
    assert again == pairs


# ---- filters -----------------------------------------------------------------------------------------------------
def test_fragments_are_never_chosen_or_rejected_and_are_counted(tmp_path: Path) -> None:
    candidates = [
        ("A brown dog sits next to it.", 0.5, True),
        ('"Dog."', 1.0, False),  # quoted, one word
        ("Key visual details:", 0.99, False),  # list header
        ("3.", 0.0, False),  # bare list marker
        ("  -  ", 0.01, False),  # bare list marker
        ("A brown cat sits next to it.", 0.2, False),
    ]
    pairs, stats = build(tmp_path, [score_record("img1", 1, candidates)], mode="sentence")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("A brown dog sits next to it.", "A brown cat sits next to it.")
    ]
    assert stats["removed"]["fragment_candidates"] == 4
    assert stats["fragment_reasons"] == {"list_header": 1, "list_marker": 2, "too_few_words": 1}
    assert pairs[0].meta["usable_candidates"] == 2


def test_fragment_rules() -> None:
    assert fragment_reason("'A dog.'", 3) == "too_few_words"
    assert fragment_reason("“A small dog runs.”", 3) is None
    assert fragment_reason("Here are the objects in the image:", 3) == "list_header"
    for marker in ("-", "•", "2.", "3)", "(b)", "iv.", "", "''"):
        assert fragment_reason(marker, 1) == "list_marker", marker
    assert fragment_reason("Dogs run fast.", 4) == "too_few_words"
    assert fragment_reason("Dogs run fast.", 3) is None


def test_each_filter_removes_exactly_its_pairs(tmp_path: Path) -> None:
    records = [
        # kept: gap 0.7
        score_record(
            "keep", 0, [("A red ball lies on the grass.", 0.9, True), ("A blue ball lies on the grass.", 0.2, False)]
        ),
        # only one usable candidate (the other is a fragment)
        score_record("lonely", 0, [("A red ball lies on the grass.", 0.9, True), ("Ball.", 0.1, False)]),
        # same text up to case, whitespace and trailing punctuation
        score_record(
            "same", 0, [("A red ball lies on the grass.", 0.9, True), ("a red  ball lies on the GRASS", 0.1, False)]
        ),
        # gap 0.05 < min_gap 0.1
        score_record(
            "close", 0, [("A red ball lies on the grass.", 0.55, True), ("A blue ball lies on the grass.", 0.5, False)]
        ),
        # all scores equal: no preference at all
        score_record(
            "flat", 0, [("A red ball lies on the grass.", 0.5, True), ("A blue ball lies on the grass.", 0.5, False)]
        ),
        # 6 words vs 15 words: ratio 2.5 > 2
        score_record(
            "long",
            0,
            [
                ("A red ball lies on grass.", 0.9, True),
                ("A large shiny red ball lies quietly on the freshly cut green grass near trees.", 0.1, False),
            ],
        ),
    ]
    pairs, stats = build(tmp_path, records, mode="sentence", min_gap=0.1, max_length_ratio=2.0)
    assert [p.image_id for p in pairs] == ["keep"]
    assert stats["removed"] == {
        "fragment_candidates": 1,
        "sentences_without_two_candidates": 1,
        "same_text_pairs": 1,
        "small_gap_pairs": 2,
        "low_chosen_score_pairs": 0,
        "unbalanced_length_pairs": 1,
        "duplicate_pairs": 0,
        "over_image_cap_pairs": 0,
    }
    # without length balance the long pair stays; with min_gap 0 the 0.05 gap stays, the zero gap never does
    pairs, stats = build(tmp_path, records, mode="sentence", min_gap=0.0, max_length_ratio=0.0)
    assert sorted(p.image_id for p in pairs) == ["close", "keep", "long"]
    assert stats["removed"]["small_gap_pairs"] == 1 and stats["removed"]["unbalanced_length_pairs"] == 0


def test_length_ratio_compares_whole_completions_in_context_mode(tmp_path: Path) -> None:
    record = score_record(
        "img",
        0,
        [("A red ball.", 0.9, True), ("A large shiny red ball lies quietly on the freshly cut grass.", 0.1, False)],
    )
    # 3 vs 12 words as sentences (ratio 4), but 3 + 13 vs 12 + 13 words as descriptions (ratio 1.56)
    pairs, stats = build(tmp_path, [record], max_length_ratio=2.0)
    assert len(pairs) == 1
    pairs, stats = build(tmp_path, [record], max_length_ratio=1.4)
    assert pairs == [] and stats["removed"]["unbalanced_length_pairs"] == 1


def test_duplicates_across_descriptions_keep_the_larger_gap(tmp_path: Path) -> None:
    # Two descriptions of one image start with the same sentence: in sentence mode (no prefix) the pairs coincide.
    a = score_record(
        "img", 0, [("A red ball lies on the grass.", 0.9, True), ("A blue ball lies on the grass.", 0.3, False)]
    )
    b = score_record(
        "img",
        0,
        [("A red ball lies on the grass.", 0.95, True), ("A blue ball lies on the grass.", 0.05, False)],
        context=["A red ball lies on the grass.", "Nothing else is there."],
        description_id="d2",
    )
    pairs, stats = build(tmp_path, [a, b], mode="sentence")
    assert len(pairs) == 1 and stats["removed"]["duplicate_pairs"] == 1
    assert pairs[0].meta["description_id"] == "d2" and pairs[0].score_chosen == 0.95
    # in context mode the descriptions differ, so both pairs stay
    pairs, stats = build(tmp_path, [a, b], mode="context")
    assert len(pairs) == 2 and stats["removed"]["duplicate_pairs"] == 0


def test_per_image_cap_keeps_the_largest_gaps(tmp_path: Path) -> None:
    context = [f"Sentence number {i} is about the picture." for i in range(6)]
    gaps = [0.3, 0.8, 0.5, 0.2, 0.8, 0.6]
    records = [
        score_record(
            "img",
            i,
            [(context[i], 0.1 + g, True), (f"Rewrite number {i} is about something else.", 0.1, False)],
            context=context,
        )
        for i, g in enumerate(gaps)
    ]
    records.append(
        score_record(
            "other", 0, [("A red ball lies on the grass.", 0.9, True), ("A blue ball lies on the grass.", 0.1, False)]
        )
    )
    pairs, stats = build(tmp_path, records, mode="sentence", max_pairs_per_image=3)
    kept = sorted(p.meta["index"] for p in pairs if p.image_id == "img")
    assert kept == [1, 4, 5]  # gaps 0.8, 0.8, 0.6
    assert stats["removed"]["over_image_cap_pairs"] == 3
    assert sum(p.image_id == "other" for p in pairs) == 1  # the cap is per image
    # a tie at the cap's edge is broken the same way whatever the input order
    pairs, _ = build(tmp_path, records, mode="sentence", max_pairs_per_image=1)
    first = [p.id for p in pairs]
    random.Random(3).shuffle(records)
    pairs, _ = build(tmp_path, records, mode="sentence", max_pairs_per_image=1)
    assert [p.id for p in pairs] == first
    assert [p.meta["index"] for p in pairs if p.image_id == "img"][0] in (1, 4)
    # 0 means no limit
    pairs, stats = build(tmp_path, records, mode="sentence", max_pairs_per_image=0)
    assert len(pairs) == 7 and stats["removed"]["over_image_cap_pairs"] == 0


# ---- split -------------------------------------------------------------------------------------------------------
def many_images(n: int) -> list[dict[str, Any]]:
    records = []
    for i in range(n):
        for index in (0, 1):
            records.append(
                score_record(
                    f"image{i:03d}",
                    index,
                    [
                        (CONTEXT[index], 0.9, True),
                        (CONTEXT[index].replace("A ", "One ", 1) + " Maybe not.", 0.2, False),
                    ],
                )
            )
    return records


def test_split_is_by_image_with_roughly_the_fraction(tmp_path: Path) -> None:
    pairs, stats = build(tmp_path, many_images(300), val_fraction=0.2)
    assert len(pairs) == 600
    split_of_image: dict[str, set[str]] = {}
    for p in pairs:
        split_of_image.setdefault(p.image_id, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of_image.values()), "an image's pairs were split across train and val"
    val_images = sum(s == {"val"} for s in split_of_image.values())
    assert 35 <= val_images <= 85  # binomial(300, 0.2): mean 60, sd 6.9
    assert stats["images_by_split"] == {"train": 300 - val_images, "val": val_images}
    assert stats["pairs_by_split"] == {"train": 2 * (300 - val_images), "val": 2 * val_images}
    # the seed picks other images; val_fraction 0 picks none
    val_seed0 = {i for i, s in split_of_image.items() if s == {"val"}}
    pairs, _ = build(tmp_path, many_images(300), "--seed", "1", val_fraction=0.2)
    assert {p.image_id for p in pairs if p.split == "val"} != val_seed0
    pairs, _ = build(tmp_path, many_images(300), val_fraction=0.0)
    assert {p.split for p in pairs} == {"train"}


# ---- determinism, exports on disk ----------------------------------------------------------------------------------
def snapshot(run_dir: Path) -> dict[str, bytes]:
    files = [run_dir / "05_pairs.jsonl", *sorted((run_dir / "05_exports").iterdir())]
    return {f.name: f.read_bytes() for f in files}


def test_two_runs_write_identical_files_whatever_the_input_order(tmp_path: Path) -> None:
    records = many_images(20)
    build(tmp_path, records, val_fraction=0.3)
    first = snapshot(tmp_path / "run")
    build(tmp_path, records, val_fraction=0.3)
    assert snapshot(tmp_path / "run") == first
    random.Random(0).shuffle(records)
    build(tmp_path, records, val_fraction=0.3)
    assert snapshot(tmp_path / "run") == first
    assert set(first) == {
        "05_pairs.jsonl",
        "trl_train.jsonl",
        "trl_val.jsonl",
        "capdpo_train.json",
        "capdpo_val.json",
        "unidpo_train.json",
        "unidpo_val.json",
        "dataset_info.json",
    }


def test_exports_hold_every_pair_of_their_split_and_stale_files_go(tmp_path: Path, sample_images: list[Path]) -> None:
    records = many_images(20)
    for r in records:
        r["image"] = str(sample_images[int(r["image_id"][-3:]) % len(sample_images)])
    pairs, stats = build(tmp_path, records, "--dataset_name", "hallu", val_fraction=0.3)
    exports = tmp_path / "run" / "05_exports"
    roots = [sample_images[0].parent]  # the pairs' images live outside the exports folder
    for split in ("train", "val"):
        expected = [p for p in pairs if p.split == split]
        assert expected
        assert import_file("trl", exports / f"trl_{split}.jsonl", allowed_roots=roots) == expected
        assert import_file("llamafactory", exports / f"hallu_{split}.json", allowed_roots=roots) == expected
        assert import_file("unidpo", exports / f"unidpo_{split}.json", allowed_roots=roots) == expected
    info = read_json(exports / "dataset_info.json")
    assert set(info) == {"hallu_train", "hallu_val", "hallu_unidpo_train", "hallu_unidpo_val"}
    assert stats["exports"]["trl"] == ["trl_train.jsonl", "trl_val.jsonl"]
    assert stats["missing_images"] == 0
    # a rerun with other settings leaves no file of the first run behind
    build(tmp_path, records, "--exports", "trl", val_fraction=0.0)
    assert sorted(f.name for f in exports.iterdir()) == ["trl_train.jsonl"]
    assert not (tmp_path / "run" / "05_exports.tmp").exists() and not (tmp_path / "run" / "05_exports.old").exists()


def test_no_pairs_still_finishes_with_empty_outputs(tmp_path: Path) -> None:
    record = score_record("img", 0, [("A red ball lies on the grass.", 0.5, True)])
    pairs, stats = build(tmp_path, [record])
    assert pairs == [] and stats["pairs"] == 0 and stats["removed"]["sentences_without_two_candidates"] == 1
    assert (tmp_path / "run" / "05_pairs.done").exists()
    assert list((tmp_path / "run" / "05_exports").iterdir()) == []


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_unfinished_input_is_refused_unless_allow_partial(tmp_path: Path) -> None:
    records = [score_record("img1", 1, THREE), score_record("img2", 1, THREE)]
    config = write_run(tmp_path, records, done=False)
    scores = tmp_path / "run" / "04_scores.jsonl"
    with scores.open("a") as fh:
        fh.write('{"id": "torn", "image_id": "im')  # a crash mid-write
    result = run_script("5_build_dpo_dataset.py", "--config", str(config))
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "04_scores.jsonl" in message[0] and "--allow_partial" in message[0]
    assert not (tmp_path / "run" / "05_pairs.jsonl").exists()

    result = run_script("5_build_dpo_dataset.py", "--config", str(config), "--allow_partial")
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(tmp_path / "run" / "05_pairs.jsonl")) == 2  # the torn record is left out
    stats = read_json(tmp_path / "run" / "05_pairs.stats.json")
    assert stats["input_partial"] is True
    assert "had not finished" in result.stdout


def test_truncated_last_line_of_a_finished_input_is_a_one_line_error(tmp_path: Path) -> None:
    records = [score_record("img1", 1, THREE), score_record("img2", 1, THREE)]
    config = write_run(tmp_path, records)
    assert run_script("5_build_dpo_dataset.py", "--config", str(config)).returncode == 0
    before = (tmp_path / "run" / "05_pairs.jsonl").read_bytes()
    scores = tmp_path / "run" / "04_scores.jsonl"
    with scores.open("a") as fh:
        fh.write('{"id": "torn", "image_id": "im')
    result = run_script("5_build_dpo_dataset.py", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{scores}:3" in lines[0] and "truncated" in lines[0]
    # the previous run's pairs, exports and completion marker are untouched
    assert (tmp_path / "run" / "05_pairs.jsonl").read_bytes() == before
    assert (tmp_path / "run" / "05_pairs.done").exists()
    assert (tmp_path / "run" / "05_exports" / "trl_train.jsonl").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(index=7), "'index' 7 is not a position"),
        (lambda r: r.pop("context"), "missing field(s) context"),
        (lambda r: r["candidates"][0].update(score=None), "not a finite number"),
        (lambda r: r["candidates"][0].pop("is_original"), "malformed candidate"),
    ],
)
def test_malformed_records_name_the_record_and_write_nothing(tmp_path: Path, change: Any, message: str) -> None:
    records = [score_record("img1", 1, THREE), score_record("img2", 1, THREE)]
    change(records[1])
    config = write_run(tmp_path, records)
    with pytest.raises(InputError, match="04_scores.jsonl:2: ") as err:
        run(load_config("pairs", ["--config", str(config)]))
    assert message in str(err.value)
    assert not (tmp_path / "run" / "05_pairs.jsonl").exists() and not (tmp_path / "run" / "05_exports").exists()


def test_missing_input_names_the_stage_to_run(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "empty")}))
    with pytest.raises(InputError, match="4_validate_sentences.py"):
        run(load_config("pairs", ["--config", str(config)]))


def test_min_chosen_score_drops_pairs_whose_best_candidate_is_still_judged_wrong(tmp_path: Path) -> None:
    records = [
        score_record(
            "accepted", 0, [("A red ball lies on grass.", 0.8, True), ("A blue ball lies on grass.", 0.1, False)]
        ),
        score_record("both_wrong", 0, [("A cat sits on a mat.", 0.4, True), ("A dog sits on a mat.", 0.05, False)]),
    ]
    pairs, stats = build(tmp_path, records, min_gap=0.1)
    assert (
        sorted(p.image_id for p in pairs) == ["accepted", "both_wrong"]
        and not stats["removed"]["low_chosen_score_pairs"]
    )
    pairs, stats = build(tmp_path, records, "--min_chosen_score", "0.5", min_gap=0.1)
    assert [p.image_id for p in pairs] == ["accepted"] and stats["removed"]["low_chosen_score_pairs"] == 1
    with pytest.raises(ConfigError, match="min_chosen_score"):
        build(tmp_path, records, "--min_chosen_score", "1.5")


def test_an_empty_input_is_refused_unless_allow_empty(tmp_path: Path) -> None:
    config = write_run(tmp_path, [])
    result = run_script("5_build_dpo_dataset.py", "--config", str(config))
    assert result.returncode == 2 and "04_scores.jsonl: holds no records" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "05_pairs.done").exists()
    stats = run(load_config("pairs", ["--config", str(config), "--allow_empty", "true"]))
    assert stats["pairs"] == 0 and (tmp_path / "run" / "05_pairs.done").exists()


def test_a_full_disk_while_exporting_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    import errno

    from capdpo.stages import build_dpo_dataset

    def full(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device")

    record = score_record("img", 0, THREE)
    config = write_run(tmp_path, [record])
    monkeypatch.setattr(build_dpo_dataset, "write_exports", full)
    with pytest.raises(OSError):
        run(load_config("pairs", ["--config", str(config)]))
    assert not (tmp_path / "run" / "05_exports.tmp").exists() and not (tmp_path / "run" / "05_pairs.done").exists()


# ---- crash and rerun -----------------------------------------------------------------------------------------------
# runs stage 5 in a child process that kills itself (SIGKILL: no handler runs) at one point of its writing
_KILLED_AT = """
import os, signal, sys
import capdpo.stages.build_dpo_dataset as stage

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[1]
if point == "writing_pairs":  # five records into the pairs file's temporary file
    real = stage.write_jsonl

    def write_jsonl(path, records):
        def records_then_die():
            for i, record in enumerate(records):
                if i == 5:
                    die()
                yield record
        return real(path, records_then_die())

    stage.write_jsonl = write_jsonl
elif point == "writing_exports":  # the pairs file written, one export half written
    def write_exports(pairs, folder, *args, **kwargs):
        (folder / "trl_train.jsonl").write_text('{"prompt": "half')
        die()

    stage.write_exports = write_exports
stage.main(sys.argv[2:])
"""


@pytest.mark.parametrize("point", ["writing_pairs", "writing_exports"])
def test_killed_mid_write_then_rerun_gives_every_pair_once_and_the_same_files(tmp_path: Path, point: str) -> None:
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    records = many_images(30)
    reference_dir, crash_dir = tmp_path / "reference", tmp_path / "crash"
    reference_dir.mkdir()
    crash_dir.mkdir()
    build(reference_dir, records, val_fraction=0.3)
    reference = reference_dir / "run"
    # the crashed run directory holds an earlier finished run with other settings, as a rerun after an edit would
    build(crash_dir, records, val_fraction=0.0)
    config = write_run(crash_dir, records, val_fraction=0.3)
    run_dir = crash_dir / "run"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT, point, "--config", str(config)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "05_pairs.done").exists()
    result = run_script("5_build_dpo_dataset.py", "--config", str(config))
    assert result.returncode == 0, result.stderr
    pairs = read_jsonl(run_dir / "05_pairs.jsonl")
    assert len(pairs) == len({p["id"] for p in pairs}) == 60
    assert snapshot(run_dir) == snapshot(reference)
    assert (run_dir / "05_pairs.done").exists()
    # nothing of the killed run is left behind: the same files as a run that never crashed
    listing = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert listing(run_dir) == listing(reference)
