"""`python -m capdpo import`: RLAIF-V parquet, MM-RLHF jsonl, Uni-DPO / LLaMA-Factory / TRL files become
05_pairs.jsonl that stage 6 trains on; bad rows are skipped with their reason, a missing column is one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capdpo.formats.interop import main as interop_main
from capdpo.formats.registry import IMPORTERS, import_file, write_exports
from capdpo.jsonl import read_json, read_jsonl, write_json, write_jsonl
from capdpo.records import PairRecord
from capdpo.splits import split_of
from tests.formats.test_exports import make_pairs

# rejected_image is written only for pairs that have one (mdpo)
PAIR_FIELDS = {f for f in PairRecord.__dataclass_fields__} - {"rejected_image"}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def run_import(*args: str) -> None:
    interop_main(list(args))


def import_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one-line error of a refused import (exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        run_import(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def pairs_of(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "05_pairs.jsonl")


def errors_of(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "05_pairs.errors.jsonl")


def rlaifv_logps(chosen: float, rejected: float) -> str:
    """RLAIF-V's logps cell: {"logps": [chosen, chosen_mean, per_token, rejected, rejected_mean, per_token]}."""
    return json.dumps({"logps": [chosen, chosen / 4, [chosen / 4] * 4, rejected, rejected / 5, [rejected / 5] * 5]})


def write_rlaifv_shards(folder: Path, rows: list[dict], split_at: int) -> None:
    """Rows as RLAIF-V-Dataset parquet shards (the image column a struct of bytes and path, as HF stores it)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("ds_name", pa.string()),
            ("image", IMAGE_TYPE),
            ("question", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("origin_dataset", pa.string()),
            ("origin_split", pa.string()),
            ("idx", pa.string()),
            ("image_path", pa.string()),
            ("logps", pa.string()),
        ]
    )
    for n, part in enumerate((rows[:split_at], rows[split_at:])):
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, folder / f"RLAIF-V-Dataset_{n:03d}.parquet", row_group_size=3)


def rlaifv_row(i: int, image: dict, question: str, chosen: str, rejected: str, logps: str | None = None) -> dict:
    return {
        "ds_name": "RLAIF-V",
        "image": image,
        "question": question,
        "chosen": chosen,
        "rejected": rejected,
        "origin_dataset": "coco",
        "origin_split": json.dumps({"model": "m", "type": "detailed description"}),
        "idx": str(i),
        "image_path": f"images/{i}.jpg",
        "logps": logps,
    }


@pytest.fixture
def rlaifv_dir(tmp_path: Path, sample_images: list[Path]) -> Path:
    png, jpg = sample_images[0].read_bytes(), sample_images[1].read_bytes()
    root = tmp_path / "local_images"
    root.mkdir()
    shutil.copy(sample_images[2], root / "third.png")
    rows = [
        rlaifv_row(
            1,
            {"bytes": png, "path": None},
            "<image>\nDescribe the image.",
            "A red ball.",
            "A blue car.",
            rlaifv_logps(-12.5, -20.25),
        ),
        rlaifv_row(2, {"bytes": jpg, "path": "x.jpg"}, "What is shown?", "A green ball.", "A dog."),
        rlaifv_row(3, {"bytes": png, "path": None}, "Is there a ball?", "Yes, a red one.", "No."),
        rlaifv_row(4, {"bytes": png, "path": None}, "Describe it.", "   ", "A cat."),  # empty chosen
        rlaifv_row(5, {"bytes": jpg, "path": None}, "Describe it.", "Same text.", "Same text."),
        rlaifv_row(6, {"bytes": b"not an image at all", "path": None}, "Describe it.", "A ball.", "A car."),
        rlaifv_row(7, {"bytes": None, "path": "third.png"}, "Colour?", "Blue.", "Red."),  # a path, no bytes
        rlaifv_row(8, {"bytes": None, "path": "missing.png"}, "Colour?", "Blue.", "Red."),
        rlaifv_row(9, {"bytes": png, "path": None}, "<image>\nDescribe the image.", "A red ball.", "A blue car."),
    ]
    folder = tmp_path / "RLAIF-V-Dataset"
    write_rlaifv_shards(folder, rows, split_at=5)
    return folder


def test_rlaifv_parquet_shards_become_pairs_with_materialized_images(
    rlaifv_dir: Path, sample_images: list[Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    root = rlaifv_dir.parent / "local_images"
    run_import(
        "--format",
        "rlaifv",
        "--input",
        str(rlaifv_dir),
        "--run_dir",
        str(run_dir),
        "--image_root",
        str(root),
        "--split",
        "auto",
        "--val_fraction",
        "0.5",
        "--seed",
        "1",
    )

    pairs = pairs_of(run_dir)
    assert [p["meta"]["idx"] for p in pairs] == ["1", "2", "3", "7"]
    assert all(set(p) == PAIR_FIELDS for p in pairs)
    png, jpg = sample_images[0].read_bytes(), sample_images[1].read_bytes()
    by_idx = {p["meta"]["idx"]: p for p in pairs}
    # embedded bytes are written once per content, named by their hash, and the id is stage 1's content id
    for idx, data, ext in (("1", png, "png"), ("2", jpg, "jpg"), ("3", png, "png")):
        digest = hashlib.sha256(data).hexdigest()
        assert by_idx[idx]["image_id"] == digest[:20]
        assert by_idx[idx]["image"] == str((run_dir / "images" / f"{digest[:20]}.{ext}").resolve())
        assert Path(by_idx[idx]["image"]).read_bytes() == data
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == sorted(
        f"{hashlib.sha256(d).hexdigest()[:20]}.{e}" for d, e in ((png, "png"), (jpg, "jpg"))
    )
    # an image given as a path is used in place
    assert by_idx["7"]["image"] == str((root / "third.png").resolve())
    assert by_idx["7"]["image_id"] == hashlib.sha256((root / "third.png").read_bytes()).hexdigest()[:20]
    # text, scores, metadata and the dataset's own reference log-probs
    first = by_idx["1"]
    assert (first["prompt"], first["chosen"], first["rejected"]) == (
        "Describe the image.",
        "A red ball.",
        "A blue car.",
    )
    assert (first["mode"], first["assistant_prefix"], first["score_chosen"], first["score_rejected"]) == (
        "context",
        "",
        1.0,
        0.0,
    )
    assert first["meta"]["reference_logps"]["chosen"] == -12.5
    assert first["meta"]["reference_logps"]["rejected_mean"] == pytest.approx(-20.25 / 5)
    assert first["meta"]["origin_dataset"] == "coco" and first["meta"]["scores_given"] is False
    assert "reference_logps" not in by_idx["2"]["meta"]
    # split by image, seeded, as stage 5 does
    assert all(p["split"] == split_of(p["image_id"], 1, 0.5) for p in pairs)

    errors = errors_of(run_dir)
    shard0, shard1 = (str(rlaifv_dir / f"RLAIF-V-Dataset_{n:03d}.parquet") for n in (0, 1))
    assert [(e["file"], e["row"]) for e in errors] == [(shard0, 4), (shard0, 5), (shard1, 1), (shard1, 3), (shard1, 4)]
    reasons = [e["reason"] for e in errors]
    assert reasons[0] == "empty chosen"
    assert reasons[1] == "chosen and rejected are the same text"
    assert reasons[2].startswith("embedded image bytes are not a readable image")
    assert reasons[3].startswith("image not found") and "missing.png" in reasons[3]
    assert reasons[4] == f"duplicate of {shard0} row 1"
    stats = read_json(run_dir / "05_pairs.stats.json")
    assert (stats["rows"], stats["pairs"], stats["skipped"], stats["with_reference_logps"]) == (9, 4, 5, 1)
    assert (run_dir / "05_pairs.done").is_file()
    assert read_json(run_dir / "05_pairs.meta.json")["config"]["interop"]["format"] == "rlaifv"


def test_a_missing_required_column_is_one_line_and_writes_nothing(
    tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture
) -> None:
    table = pa.Table.from_pylist(
        [{"image": {"bytes": sample_images[0].read_bytes(), "path": None}, "chosen": "a b", "rejected": "c d"}],
        schema=pa.schema([("image", IMAGE_TYPE), ("chosen", pa.string()), ("rejected", pa.string())]),
    )
    pq.write_table(table, tmp_path / "data.parquet")
    run_dir = tmp_path / "run"
    err = import_error(
        capsys, "--format", "rlaifv", "--input", str(tmp_path / "data.parquet"), "--run_dir", str(run_dir)
    )
    assert "missing column 'question'" in err and "data.parquet" in err
    assert not (run_dir / "05_pairs.jsonl").exists()

    write_jsonl(tmp_path / "dpo_pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "video": "v/1"}])
    err = import_error(
        capsys, "--format", "mmrlhf", "--input", str(tmp_path / "dpo_pairs.jsonl"), "--run_dir", str(run_dir)
    )
    assert "no row has column 'image'" in err
    err = import_error(capsys, "--format", "parquet", "--input", "x", "--run_dir", str(run_dir))
    assert "--format" in err and "rlaifv" in err


def test_existing_pairs_are_replaced_only_with_overwrite(
    rlaifv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    args = ["--format", "rlaifv", "--input", str(rlaifv_dir), "--run_dir", str(run_dir)]
    run_import(*args, "--max_rows", "2")
    before = (run_dir / "05_pairs.jsonl").read_bytes()
    err = import_error(capsys, *args)
    assert "--overwrite" in err and "05_pairs.jsonl" in err
    assert (run_dir / "05_pairs.jsonl").read_bytes() == before and (run_dir / "05_pairs.done").is_file()
    run_import(*args, "--overwrite", "true")
    assert len(pairs_of(run_dir)) == 3  # rows 7 and 8 need --image_root; row 9 duplicates row 1


def test_mmrlhf_dpo_pairs(tmp_path: Path, sample_images: list[Path]) -> None:
    data = tmp_path / "MM-RLHF"
    (data / "long").mkdir(parents=True)
    for i in range(3):
        shutil.copy(sample_images[i], data / "long" / f"{i}.png")
    rows = [
        {
            "prompt": "<image>\nWhat is in the picture?",
            "chosen": "A red ball.",
            "rejected": "A train.",
            "image": "long/0.png",
            "reference_chosen_logp": -8.5,
            "reference_rejected_logp": -9.75,
            "chosen_reason": "accurate",
            "rejected_reason": "hallucinated train",
        },
        {
            "prompt": "Describe.",
            "chosen": "Green.",
            "rejected": "Purple.",
            "image": "long/1.png",
            "score_chosen": 4.5,
            "score_rejected": 1.0,
        },
        {"prompt": "Describe.", "chosen": "x", "rejected": "y", "video": "video/1"},
        {"prompt": "Describe.", "chosen": "x", "rejected": "y", "image": "long/2.png", "is_tie": True},
        {"prompt": "Describe.", "chosen": "x", "rejected": "y", "image": ["long/0.png", "long/1.png"]},
        {"prompt": "Describe.", "chosen": "x", "rejected": "y", "image": "long/none.png"},
        {"prompt": "Describe.", "chosen": None, "rejected": "y", "image": "long/2.png"},
    ]
    write_jsonl(data / "dpo_pairs.jsonl", rows)
    run_dir = tmp_path / "run"
    run_import(
        "--format", "mmrlhf", "--input", str(data / "dpo_pairs.jsonl"), "--run_dir", str(run_dir), "--split", "train"
    )

    pairs = pairs_of(run_dir)
    assert len(pairs) == 2 and all(p["split"] == "train" for p in pairs)
    assert pairs[0]["prompt"] == "What is in the picture?"
    assert pairs[0]["image"] == str((data / "long" / "0.png").resolve())  # relative to the file's folder
    assert pairs[0]["meta"]["reference_logps"] == {
        "chosen": -8.5,
        "rejected": -9.75,
        "from": "the row's reference_chosen_logp / reference_rejected_logp",
    }
    assert pairs[0]["meta"]["rejected_reason"] == "hallucinated train"
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"]) == (1.0, 0.0)
    assert (pairs[1]["score_chosen"], pairs[1]["score_rejected"], pairs[1]["meta"]["scores_given"]) == (4.5, 1.0, True)
    errors = errors_of(run_dir)
    assert [e["row"] for e in errors] == [3, 4, 5, 6, 7]
    assert errors[0]["reason"] == "video rows are not supported"
    assert errors[1]["reason"].startswith("is_tie")
    assert errors[2]["reason"].startswith("2 images")
    assert errors[3]["reason"].startswith("image not found")
    assert errors[4]["reason"] == "'chosen' is missing or not a string"


def test_unidpo_alpaca_with_scores_and_a_malformed_row(tmp_path: Path, sample_images: list[Path]) -> None:
    rows = [
        {
            "instruction": "<image>Here is the question",
            "chosen": "Better.",
            "rejected": "Worse.",
            "score_chosen": 4.0,
            "score_rejected": 2.5,
            "images": [str(sample_images[0])],
        },
        {
            "instruction": "<image>Another one",
            "chosen": ["not", "a", "string"],
            "rejected": "Worse.",
            "score_chosen": 4.0,
            "score_rejected": 2.5,
            "images": [str(sample_images[1])],
        },
        {"instruction": "<image>Third", "chosen": "Same.", "rejected": "Same.", "images": [str(sample_images[2])]},
        {
            "instruction": "Fourth",
            "input": "with <image> inside",
            "chosen": "Yes.",
            "rejected": "No.",
            "images": [sample_images[3].name],
        },
    ]
    write_json(tmp_path / "uni_dpo.json", rows)
    run_dir = tmp_path / "run"
    run_import(
        "--format",
        "unidpo",
        "--input",
        str(tmp_path / "uni_dpo.json"),
        "--run_dir",
        str(run_dir),
        "--image_root",
        str(sample_images[0].parent),
        "--val_fraction",
        "0",
    )

    pairs = pairs_of(run_dir)
    assert [p["prompt"] for p in pairs] == ["Here is the question", "Fourth\nwith inside"]
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"]) == (4.0, 2.5)
    assert pairs[1]["image"] == str(sample_images[3].resolve())
    assert all(p["split"] == "train" for p in pairs)
    errors = errors_of(run_dir)
    assert [e["row"] for e in errors] == [2, 3]
    assert "'chosen' and 'rejected' must be strings" in errors[0]["reason"]  # the importer's own message
    assert errors[1]["reason"] == "chosen and rejected are the same text"


def test_llamafactory_sharegpt_columns_from_dataset_info(
    tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture
) -> None:
    rows = [
        {
            "msgs": [{"role": "user", "content": "<image>What colour?"}],
            "good": {"role": "assistant", "content": "Red."},
            "bad": {"role": "assistant", "content": "Blue."},
            "pics": [str(sample_images[0])],
        },
        {
            "msgs": [{"role": "assistant", "content": "<image>oops"}],
            "good": {"role": "assistant", "content": "a"},
            "bad": {"role": "assistant", "content": "b"},
            "pics": [str(sample_images[1])],
        },
    ]
    write_json(tmp_path / "prefs.json", rows)
    info = {
        "prefs": {
            "file_name": "prefs.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "msgs", "chosen": "good", "rejected": "bad", "images": "pics"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }
    write_json(tmp_path / "dataset_info.json", info)
    run_dir = tmp_path / "run"
    args = ["--format", "llamafactory", "--input", str(tmp_path / "prefs.json"), "--run_dir", str(run_dir)]
    allowed = ["--allowed_roots", str(sample_images[0].parent)]  # the rows name images outside the input folder
    run_import(*args, "--dataset_info", str(tmp_path / "dataset_info.json"), *allowed)
    pairs = pairs_of(run_dir)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("What colour?", "Red.", "Blue.")]
    assert "must be one 'user' turn" in errors_of(run_dir)[0]["reason"]
    # without dataset_info the default sharegpt columns are expected
    err = import_error(capsys, *args, "--run_dir", str(tmp_path / "other"))
    assert "no row has column 'conversations'" in err


@pytest.mark.parametrize("fmt", ["trl", "llamafactory", "unidpo"])
def test_command_line_round_trip_of_capdpo_exports(tmp_path: Path, sample_images: list[Path], fmt: str) -> None:
    """import(export(x)) == x through the command, splits included (the exports write one file per split)."""
    pairs = make_pairs(sample_images)
    write_exports(pairs, tmp_path / "exports", [fmt], dataset_name="capdpo")
    names = {"trl": "trl_{}.jsonl", "llamafactory": "capdpo_{}.json", "unidpo": "unidpo_{}.json"}
    for split in ("train", "val"):
        run_dir = tmp_path / f"run_{split}"
        extra = ["--dataset_info", str(tmp_path / "exports" / "dataset_info.json")] if fmt == "llamafactory" else []
        run_import(
            "--format",
            fmt,
            "--input",
            str(tmp_path / "exports" / names[fmt].format(split)),
            "--run_dir",
            str(run_dir),
            "--val_fraction",
            "0.9",
            "--allowed_roots",
            str(sample_images[0].parent),
            *extra,
        )
        assert pairs_of(run_dir) == [p.to_dict() for p in pairs if p.split == split]
        assert errors_of(run_dir) == []


def test_new_formats_are_in_the_exports_importer_registry(rlaifv_dir: Path, tmp_path: Path) -> None:
    pairs = import_file("rlaifv", rlaifv_dir / "RLAIF-V-Dataset_000.parquet", images_dir=tmp_path / "img", split="val")
    assert len(pairs) == 5 and {p.split for p in pairs} == {"val"}
    assert all(Path(p.image).parent == (tmp_path / "img").resolve() for p in pairs)
    assert "mmrlhf" in IMPORTERS


def test_stage6_accepts_and_trains_on_imported_pairs(rlaifv_dir: Path, tmp_path: Path, tiny_models) -> None:
    from capdpo.models.loading import load_processor
    from capdpo.sections import load_config
    from capdpo.training.data import PairEncoder, check_pairs, read_pairs
    from capdpo.training.dpo import run_dpo as run_training

    run_dir = tmp_path / "run"
    run_import("--format", "rlaifv", "--input", str(rlaifv_dir), "--run_dir", str(run_dir), "--split", "train")
    encoder = PairEncoder(load_processor(str(tiny_models["strong"])), max_length=2048)
    stats = check_pairs(read_pairs(run_dir / "05_pairs.jsonl"), encoder, run_dir / "05_pairs.jsonl")
    assert stats["longest_prompt_tokens"] > 0 and stats["pairs_truncated"] == 0

    cfg = load_config(
        "train",
        [
            "--run_dir",
            str(run_dir),
            "--strong_model",
            str(tiny_models["strong"]),
            "--max_steps",
            "1",
            "--gradient_accumulation_steps",
            "1",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--save_steps",
            "10",
        ],
    )
    outcome = run_training(cfg)
    assert outcome.summary["steps"] == 1 and outcome.summary["train_pairs"] == 3
    assert (run_dir / "06_train" / "adapter" / "adapter_config.json").is_file()


# ---- hostile input ------------------------------------------------------------------------------------------
def test_image_paths_that_lead_outside_the_input_folder_are_rejected_rows(
    tmp_path: Path, sample_images: list[Path]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sample_images[0], data / "ok.png")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(sample_images[1], outside)
    (data / "link.png").symlink_to(outside)
    rows = [
        {"prompt": "Describe.", "chosen": "A red ball.", "rejected": "A dog.", "image": "ok.png"},
        {"prompt": "Describe.", "chosen": "A red ball.", "rejected": "A cat.", "image": "../../../../etc/passwd"},
        {"prompt": "Describe.", "chosen": "A red ball.", "rejected": "A cow.", "image": str(outside)},
        {"prompt": "Describe.", "chosen": "A red ball.", "rejected": "A hen.", "image": "link.png"},
    ]
    write_jsonl(data / "dpo_pairs.jsonl", rows)
    run_dir = tmp_path / "run"
    run_import("--format", "mmrlhf", "--input", str(data / "dpo_pairs.jsonl"), "--run_dir", str(run_dir))
    assert [p["image"] for p in pairs_of(run_dir)] == [str((data / "ok.png").resolve())]
    errors = errors_of(run_dir)
    assert [e["row"] for e in errors] == [2, 3, 4]
    assert all("leads outside" in e["reason"] for e in errors)
    # a folder the user names explicitly is allowed
    run_import(
        "--format", "mmrlhf", "--input", str(data / "dpo_pairs.jsonl"), "--run_dir", str(tmp_path / "run2"),
        "--allowed_roots", str(tmp_path),
    )  # fmt: skip
    assert len(pairs_of(tmp_path / "run2")) == 3  # ok, elsewhere.png and the link to it; /etc/passwd never


@pytest.mark.parametrize("name", ["../../escape", "/tmp/x", ".hidden", "a/b"])
def test_a_dataset_name_cannot_become_a_path(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    err = import_error(
        capsys, "--format", "trl", "--input", "x.jsonl", "--run_dir", str(tmp_path / "run"), "--dataset_name", name
    )
    assert "--dataset_name" in err and "not a plain name" in err
    from capdpo.errors import ConfigError
    from capdpo.pairs.config import PairsConfig

    with pytest.raises(ConfigError, match="pairs.dataset_name"):
        PairsConfig(dataset_name=name)


def test_embedded_images_over_the_limits_are_rejected_without_being_decoded(tmp_path: Path) -> None:
    from tests.stages.test_prepare_images import png_claiming

    rows = [
        rlaifv_row(1, {"bytes": png_claiming(12_000, 12_000), "path": None}, "Q?", "A red ball.", "A dog."),
    ]
    write_rlaifv_shards(tmp_path / "small", rows, 1)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_import("--format", "rlaifv", "--input", str(tmp_path / "small"), "--run_dir", str(run_dir))
    (error,) = errors_of(run_dir)
    assert "too large" in error["reason"] and "144.0 M pixels" in error["reason"]
    # a row group whose image data inflates beyond the byte limit is skipped unread
    bomb = {"bytes": b"\x00" * (3 * 2**20), "path": None}
    pq.write_table(
        pa.Table.from_pylist(
            [{**rows[0], "image": bomb}],
            schema=pa.schema(
                [("image", IMAGE_TYPE), ("question", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]
            ),
        ),
        tmp_path / "bomb.parquet",
        compression="zstd",
    )
    with pytest.raises(SystemExit):
        run_import(
            "--format",
            "rlaifv",
            "--input",
            str(tmp_path / "bomb.parquet"),
            "--run_dir",
            str(tmp_path / "r2"),
            "--max_image_bytes",
            str(2**20),
        )
    (error,) = errors_of(tmp_path / "r2")
    assert "skipped unread" in error["reason"] and "max_image_bytes" in error["reason"]
