"""Pairs with a rejected image (the mdpo loss type's) keep it through exports and imports (`rejected_images`)."""

from __future__ import annotations

from pathlib import Path

from capdpo.formats.registry import import_file, write_exports
from capdpo.jsonl import read_json, read_jsonl, write_jsonl
from tests.formats.test_exports import make_pairs


def test_rejected_images_round_trip_through_trl_and_llamafactory(tmp_path: Path, sample_images: list[Path]) -> None:
    pairs = [p for p in make_pairs(sample_images) if p.split == "train"]
    pairs[0].rejected_image = str(sample_images[4])
    write_exports(pairs, tmp_path, ["trl", "llamafactory"])
    trl_rows = read_jsonl(tmp_path / "trl_train.jsonl")
    sharegpt_rows = read_json(tmp_path / "capdpo_train.json")
    assert trl_rows[0]["rejected_images"] == [str(sample_images[4])] == sharegpt_rows[0]["rejected_images"]
    assert all("rejected_images" not in r for r in trl_rows[1:] + sharegpt_rows[1:])
    allowed = [sample_images[0].parent]
    for name, path in (("trl", "trl_train.jsonl"), ("llamafactory", "capdpo_train.json")):
        assert import_file(name, tmp_path / path, allowed_roots=allowed) == pairs


def test_foreign_rows_with_rejected_images_import_them(tmp_path: Path, sample_images: list[Path]) -> None:
    row = {
        "images": [sample_images[0].name],
        "rejected_images": [sample_images[1].name],  # ms-swift's column, relative to the file's folder
        "prompt": "What is shown?",
        "chosen": "A red circle.",
        "rejected": "A blue square.",
    }
    folder = sample_images[0].parent
    write_jsonl(folder / "swift_rows.jsonl", [row])
    try:
        [pair] = import_file("trl", folder / "swift_rows.jsonl")
    finally:
        (folder / "swift_rows.jsonl").unlink()
    assert pair.rejected_image == str(sample_images[1]) and pair.image == str(sample_images[0])
