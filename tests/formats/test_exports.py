"""Exports to TRL / LLaMA-Factory / Uni-DPO: what the trainers read, and import(export(x)) == x."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from capdpo.errors import InputError
from capdpo.formats.registry import import_file, write_exports
from capdpo.formats.rows import IMAGE_TAG
from capdpo.formats.trl import row_of as trl_row
from capdpo.jsonl import read_json, write_json, write_jsonl
from capdpo.records import PairRecord

PROMPT = "Describe this image in detail."

ALLOWED: list[Path] = []  # the test images' folder: exports name images outside the export folder


@pytest.fixture(autouse=True)
def _images_folder_allowed(sample_images: list[Path]) -> None:
    ALLOWED[:] = [sample_images[0].parent]


def _importer(name: str):  # noqa: ANN202
    def importer(path: Path, **options):  # noqa: ANN001, ANN003, ANN202
        return import_file(name, path, allowed_roots=ALLOWED, **options)

    return importer


import_trl = _importer("trl")
import_llamafactory = _importer("llamafactory")
import_unidpo = _importer("unidpo")


def make_pairs(images: list[Path]) -> list[PairRecord]:
    """Pairs of both modes and splits, with awkward text (unicode, quotes, newlines) and nested meta."""
    pairs = []
    for i in range(6):
        sentence_mode = i % 2 == 1
        pairs.append(
            PairRecord(
                id=f"pair{i}",
                image_id=f"image{i % 3}",
                image=str(images[i % 3]),
                prompt=PROMPT if i != 4 else 'Décris l\'image — "en détail".\nPlease.',
                chosen=f"A red ball {i} lies on the grass." if sentence_mode else f"A red ball {i}. The sky is blue.",
                rejected=f"A blue ball {i} lies on the grass."
                if sentence_mode
                else f"A blue ball {i}. The sky is blue.",
                score_chosen=0.9 - i / 100,
                score_rejected=1 / 3,
                mode="sentence" if sentence_mode else "context",
                split="val" if i % 3 == 2 else "train",
                assistant_prefix="A dog sits. It is brown." if i in (1, 3) else "",
                meta={"gap": 0.5 + i / 7, "index": i, "nested": {"list": [1, 2.5, "x"], "flag": True}, "none": None},
            )
        )
    return pairs


@pytest.fixture
def pairs(sample_images: list[Path]) -> list[PairRecord]:
    return make_pairs(sample_images)


def of_split(pairs: list[PairRecord], split: str) -> list[PairRecord]:
    return [p for p in pairs if p.split == split]


# ---- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "name", "importer"),
    [
        ("trl", "trl_{split}.jsonl", import_trl),
        ("llamafactory", "capdpo_{split}.json", import_llamafactory),
        ("unidpo", "unidpo_{split}.json", import_unidpo),
    ],
)
def test_import_of_export_gives_back_the_pairs(tmp_path: Path, pairs: list[PairRecord], fmt, name, importer) -> None:
    written = write_exports(pairs, tmp_path, [fmt])
    assert written[fmt] == [name.format(split="train"), name.format(split="val")]
    for split in ("train", "val"):
        assert importer(tmp_path / name.format(split=split)) == of_split(pairs, split)


def test_relative_image_paths_round_trip_through_image_root(tmp_path: Path, pairs: list[PairRecord]) -> None:
    root = str(Path(pairs[0].image).parent)
    write_exports(pairs, tmp_path, ["llamafactory"], image_root=root)
    rows = read_json(tmp_path / "capdpo_train.json")
    assert all(not Path(r["images"][0]).is_absolute() for r in rows)
    assert import_llamafactory(tmp_path / "capdpo_train.json", image_root=root) == of_split(pairs, "train")


# ---- what the trainers read ----------------------------------------------------------------------------------------
def test_llamafactory_rows_and_dataset_info(tmp_path: Path, pairs: list[PairRecord]) -> None:
    write_exports(pairs, tmp_path, ["llamafactory", "unidpo"], dataset_name="hallu")
    info = read_json(tmp_path / "dataset_info.json")
    sharegpt = {
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }
    assert info["hallu_train"] == {"file_name": "hallu_train.json", **sharegpt}
    assert info["hallu_val"] == {"file_name": "hallu_val.json", **sharegpt}
    assert info["hallu_unidpo_train"]["file_name"] == "unidpo_train.json"
    assert info["hallu_unidpo_train"]["formatting"] == "alpaca" and info["hallu_unidpo_train"]["ranking"] is True
    assert info["hallu_unidpo_train"]["columns"]["score_chosen"] == "score_chosen"
    for key, entry in info.items():
        assert (tmp_path / entry["file_name"]).is_file(), key

    # LLaMA-Factory's sharegpt ranking rules: the conversation alternates human/gpt and ends on a human turn (odd
    # length), chosen and rejected are single gpt messages, and there is one <image> tag per image.
    by_id = {p.id: p for p in pairs}
    for row in read_json(tmp_path / "hallu_train.json"):
        turns = row["conversations"]
        assert len(turns) % 2 == 1 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) + ["human"]
        assert row["chosen"]["from"] == row["rejected"]["from"] == "gpt"
        assert sum(t["value"].count(IMAGE_TAG) for t in turns) == len(row["images"]) == 1
        assert Path(row["images"][0]).is_absolute()
        pair = by_id[row["id"]]
        assert turns[0]["value"] == IMAGE_TAG + pair.prompt
        # sentence mode: the earlier sentences lead both answers
        prefix = pair.assistant_prefix + " " if pair.assistant_prefix else ""
        assert row["chosen"]["value"] == prefix + pair.chosen and row["rejected"]["value"] == prefix + pair.rejected
    for row in read_json(tmp_path / "unidpo_train.json"):
        pair = by_id[row["id"]]
        assert row["instruction"] == IMAGE_TAG + pair.prompt and row["input"] == ""
        assert (row["score_chosen"], row["score_rejected"]) == (pair.score_chosen, pair.score_rejected)


def test_exports_load_as_datasets(tmp_path: Path, pairs: list[PairRecord]) -> None:
    import datasets

    write_exports(pairs, tmp_path)
    for name in ("trl_train.jsonl", "capdpo_train.json", "unidpo_train.json"):
        ds = datasets.load_dataset("json", data_files=str(tmp_path / name), split="train")
        assert len(ds) == len(of_split(pairs, "train")), name
        assert ds[0]["id"] == of_split(pairs, "train")[0].id


def test_trl_rows_pass_trls_own_vision_preprocessing(tmp_path: Path, pairs: list[PairRecord], tiny_models) -> None:
    """TRL's DPOTrainer renders vision rows in `DataCollatorForVisionPreference` (TRL's chat template handling and
    the processor); the completion it trains on must be exactly the answer plus the end of turn."""
    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from capdpo.models.loading import load_processor

    write_exports(pairs, tmp_path, ["trl"])
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl_train.jsonl"), split="train")
    processor = load_processor(str(tiny_models["strong"]))
    tokenizer = processor.tokenizer
    batch = DataCollatorForVisionPreference(processor)([dict(row) for row in ds])
    rows = of_split(pairs, "train")
    n = len(rows)
    assert batch["input_ids"].shape[0] == 2 * n  # chosen rows, then rejected rows
    assert batch["image_grid_thw"].shape[0] == 2 * n
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, pair in enumerate(rows):
        prefix = pair.assistant_prefix + " " if pair.assistant_prefix else ""
        for j, answer in ((i, pair.chosen), (i + n, pair.rejected)):
            ids, mask = batch["input_ids"][j], batch["completion_mask"][j].bool()
            prompt = tokenizer.decode(ids[batch["attention_mask"][j].bool() & ~mask])
            assert tokenizer.decode(ids[mask]) == prefix + answer + "<|im_end|>\n"
            assert prompt.endswith(pair.prompt + "<|im_end|>\n<|im_start|>assistant\n")
            assert (ids[~mask] == image_pad).any()


def test_a_trailing_assistant_message_would_break_trl_completions(tiny_models) -> None:
    """Why sentence-mode exports fold the prefix into the completions: TRL renders the prefix and the completion
    as two assistant turns, so the trained completion would start by closing the answer."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    from capdpo.models.loading import load_processor

    processor = load_processor(str(tiny_models["strong"]))
    example = {
        "prompt": prepare_multimodal_messages(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A dog sits."}]},
            ],
            images=["unused.png"],
        ),
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "It is brown."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "It is green."}]}],
    }
    rendered = apply_chat_template(example, processor)
    assert rendered["prompt"].endswith("assistant\nA dog sits.")
    assert rendered["chosen"].startswith("<|im_end|>")  # if TRL ever continues the message, revisit the export


def test_trl_rows_train_one_dpo_step(tmp_path: Path, pairs: list[PairRecord], tiny_models) -> None:
    """The export goes straight into `trl.DPOTrainer` (its extra capdpo columns are dropped by the trainer)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from capdpo.models.loading import load_vlm

    write_exports(pairs, tmp_path, ["trl"])
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "trl_train.jsonl"), split="train")
    loaded = load_vlm(str(tiny_models["strong"]), device="cpu", dtype="float32")
    args = DPOConfig(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=loaded.model, args=args, train_dataset=ds, processing_class=loaded.processor)
    result = trainer.train()
    assert result.global_step == 1
    assert result.training_loss == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: log 2


# ---- other people's rows -----------------------------------------------------------------------------------------
def test_foreign_trl_rows_import_with_content_ids(tmp_path: Path, sample_images: list[Path]) -> None:
    image = str(sample_images[0])
    rows = [
        {
            "images": [image],
            "prompt": [
                {"role": "system", "content": "Be precise."},
                {"role": "user", "content": "What is shown?"},
                {"role": "assistant", "content": "A circle is shown."},
            ],
            "chosen": [{"role": "assistant", "content": "It is red."}],
            "rejected": [{"role": "assistant", "content": "It is green."}],
        }
    ]
    write_jsonl(tmp_path / "foreign.jsonl", rows)
    (pair,) = import_trl(tmp_path / "foreign.jsonl")
    assert pair.image_id == hashlib.sha256(Path(image).read_bytes()).hexdigest()[:20]
    assert (pair.prompt, pair.assistant_prefix, pair.mode) == ("What is shown?", "A circle is shown.", "sentence")
    assert (pair.chosen, pair.rejected, pair.split) == ("It is red.", "It is green.", "train")
    assert pair.meta == {"imported_from": "trl", "scores_given": False}
    assert import_trl(tmp_path / "foreign.jsonl")[0].id == pair.id  # ids are stable


def test_foreign_sharegpt_with_other_columns_via_dataset_info(tmp_path: Path, sample_images: list[Path]) -> None:
    rows = [
        {
            "messages": [{"role": "user", "content": "Question: <image> what colour?"}],
            "better": {"role": "assistant", "content": "Red."},
            "worse": {"role": "assistant", "content": "Green."},
            "pics": [str(sample_images[1])],
        }
    ]
    write_json(tmp_path / "theirs.json", rows)
    write_json(
        tmp_path / "dataset_info.json",
        {
            "theirs": {
                "file_name": "theirs.json",
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {"messages": "messages", "chosen": "better", "rejected": "worse", "images": "pics"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            }
        },
    )
    (pair,) = import_llamafactory(tmp_path / "theirs.json", dataset_info=tmp_path / "dataset_info.json", split="val")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.split) == ("Question: what colour?", "Red.", "Green.", "val")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}, "0 images"),
        ({"images": ["a.png", "b.png"], "prompt": "x", "chosen": "a", "rejected": "b"}, "2 images"),
        ({"images": ["a.png"], "prompt": "x", "chosen": "a"}, "missing 'rejected'"),
        (
            {"images": ["a.png"], "prompt": [{"role": "user", "content": "x"}] * 2, "chosen": "a", "rejected": "b"},
            "multi-turn",
        ),
        ({"images": [{"bytes": "..."}], "prompt": "x", "chosen": "a", "rejected": "b"}, "no file path"),
    ],
)
def test_bad_trl_rows_name_file_and_row(tmp_path: Path, row: dict, message: str) -> None:
    if "images" not in row:
        row = {**row, "images": []}
    write_jsonl(tmp_path / "bad.jsonl", [{"images": ["ok.png"], "prompt": "x", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(InputError, match="bad.jsonl row 2") as err:
        import_trl(tmp_path / "bad.jsonl")
    assert message in str(err.value)


def test_a_tampered_prefix_is_an_error_not_a_silent_change(tmp_path: Path, pairs: list[PairRecord]) -> None:
    write_exports(pairs, tmp_path, ["unidpo"])
    rows = read_json(tmp_path / "unidpo_train.json")
    sentence_row = next(r for r in rows if r["assistant_prefix"])
    sentence_row["chosen"] = "Something else entirely."
    write_json(tmp_path / "unidpo_train.json", rows)
    with pytest.raises(InputError, match="does not start with the row's assistant_prefix"):
        import_unidpo(tmp_path / "unidpo_train.json")


def test_trl_row_shape(pairs: list[PairRecord]) -> None:
    row = trl_row(pairs[1])  # sentence mode with a prefix
    assert row["images"] == [pairs[1].image]
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    assert row["chosen"] == [
        {"role": "assistant", "content": [{"type": "text", "text": "A dog sits. It is brown. " + pairs[1].chosen}]}
    ]
