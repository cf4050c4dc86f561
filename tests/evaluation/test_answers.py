"""Benchmark answers on the tiny model: each benchmark's format, yes/no normalisation, resume after SIGKILL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from capdpo.errors import InputError
from capdpo.evaluation.amber import amber_queries
from capdpo.evaluation.answers import main
from capdpo.evaluation.yesno import normalise_yes_no
from capdpo.jsonl import read_jsonl
from capdpo.sections import load_config
from tests.helpers import kill_when, run_script

GEN = ["--max_new_tokens", "6", "--yes_no_max_new_tokens", "3", "--device", "cpu"]


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Yes", "Yes"),
        ("no.", "No"),
        ("Yes, the sky is sunny.", "Yes"),
        ("No, there is no dog in this image.", "No"),
        ("  **No**", "No"),
        ("There is no dog.", "No"),
        ("The cat is not on the table.", "No"),
        ("I think yes.", "Yes"),
        ("Maybe yes, maybe no.", None),
        ("Yes and no.", "Yes"),  # a leading verdict decides
        ("The sky is sunny.", None),
        ("Nope", None),
        ("", None),
    ],
)
def test_normalise_yes_no(text: str, verdict: str | None) -> None:
    assert normalise_yes_no(text) == verdict


@pytest.fixture
def amber(tmp_path: Path, sample_images: list[Path]) -> dict[str, Path]:
    """AMBER-style query file and image folder: 3 generative and 3 discriminative queries."""
    images = tmp_path / "amber_images"
    images.mkdir()
    for n, src in enumerate(sample_images, start=1):
        shutil.copy(src, images / f"AMBER_{n}.jpg")
    queries = [{"id": i, "image": f"AMBER_{i}.jpg", "query": "Describe this image."} for i in (1, 2, 3)]
    queries += [
        {"id": 1005, "image": "AMBER_1.jpg", "query": "Is there a ball in this image?"},
        {"id": 1006, "image": "AMBER_4.jpg", "query": "Is the ball red?"},
        {"id": 1007, "image": "AMBER_6.jpg", "query": "Is there direct contact between the ball and the wall?"},
    ]
    query_file = tmp_path / "query_all.json"
    query_file.write_text(json.dumps(queries))
    return {"queries": query_file, "images": images, "out": tmp_path / "eval" / "answers" / "amber.json"}


def amber_args(amber: dict[str, Path], model: Path, benchmark: str = "amber") -> list[str]:
    return ["--benchmark", benchmark, "--model", str(model), "--data", str(amber["queries"]),
            "--images", str(amber["images"]), "--out", str(amber["out"]), *GEN]  # fmt: skip


def test_amber_answers(amber: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    main(amber_args(amber, tiny_models["strong"]))
    rows = json.loads(amber["out"].read_text())
    assert [r["id"] for r in rows] == [1, 2, 3, 1005, 1006, 1007]
    assert all(set(r) == {"id", "response"} and isinstance(r["response"], str) for r in rows)
    work = {r["id"]: r for r in read_jsonl(amber["out"].with_name("amber.work.jsonl"))}
    assert sorted(work) == ["1", "1005", "1006", "1007", "2", "3"]
    for row in rows:
        raw = work[str(row["id"])]["text"]
        expected = raw if row["id"] <= 1004 else (normalise_yes_no(raw) or raw)
        assert row["response"] == expected
    meta = json.loads(amber["out"].with_name("amber.meta.json").read_text())
    assert meta["stats"]["queries"] == 6 and meta["stats"]["generated"] == 6
    assert meta["stats"]["yes"] + meta["stats"]["no"] + meta["stats"]["yes_no_unrecognised"] == 3

    # The answer file is rebuilt from the work file: answers that say yes/no in words become exactly Yes / No.
    lines = amber["out"].with_name("amber.work.jsonl").read_text().splitlines()
    replies = {"1005": "No, there is no ball.", "1006": "Yes, it is red.", "1007": "It is hard to tell."}
    edited = []
    for line in lines:
        record = json.loads(line)
        record["text"] = replies.get(record["id"], record["text"])
        edited.append(json.dumps(record))
    amber["out"].with_name("amber.work.jsonl").write_text("\n".join(edited) + "\n")
    main(amber_args(amber, tiny_models["strong"]))  # everything resumed: nothing generated
    rows = {r["id"]: r["response"] for r in json.loads(amber["out"].read_text())}
    assert (rows[1005], rows[1006], rows[1007]) == ("No", "Yes", "It is hard to tell.")
    meta = json.loads(amber["out"].with_name("amber.meta.json").read_text())
    assert (meta["stats"]["generated"], meta["stats"]["yes"], meta["stats"]["no"]) == (0, 1, 1)


def test_amber_parts_and_suffix(amber: dict[str, Path]) -> None:
    args = ["--data", str(amber["queries"]), "--images", str(amber["images"]), "--model", "m/m", "--out", "x.json"]
    generative, _ = amber_queries(load_config("answers", ["--benchmark", "amber_g", *args]).section)
    assert [q.question_id for q in generative] == [1, 2, 3] and not any(q.yes_no for q in generative)
    discriminative, _ = amber_queries(
        load_config("answers", ["--benchmark", "amber_d", "--yes_no_suffix", " Answer yes or no.", *args]).section
    )
    assert [q.question_id for q in discriminative] == [1005, 1006, 1007] and all(q.yes_no for q in discriminative)
    assert discriminative[1].prompt == "Is the ball red? Answer yes or no."


def test_changed_settings_are_refused(amber: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    args = amber_args(amber, tiny_models["strong"], "amber_g")
    main(args)
    with pytest.raises(InputError, match="holds answers made with other settings"):
        from capdpo.evaluation.answers import run

        run(load_config("answers", [*args, "--max_new_tokens", "7"]))


def test_missing_image_is_named_before_loading(amber: dict[str, Path]) -> None:
    (amber["images"] / "AMBER_6.jpg").unlink()
    from capdpo.evaluation.answers import run

    with pytest.raises(InputError, match=r"AMBER_6.jpg: image not found \(1 of 6 queries"):
        run(load_config("answers", amber_args(amber, Path("/nonexistent/model"))))


def test_mmhal_format(tmp_path: Path, sample_images: list[Path], tiny_models: dict[str, Path]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    template = []
    for i, src in enumerate(sample_images[:3]):
        shutil.copy(src, images / f"photo_{i}.jpg")
        template.append(
            {
                "question_type": "attribute",
                "question_topic": "test",
                "image_id": f"id{i}",
                "image_src": f"https://example.invalid/some/path/photo_{i}.jpg",
                "image_content": ["Ball"],
                "question": f"What colour is ball {i}?",
                "gt_answer": "Red.",
                "model_answer": "",
            }
        )
    data = tmp_path / "response_template.json"
    data.write_text(json.dumps(template))
    out = tmp_path / "answers" / "mmhal.json"
    main(["--benchmark", "mmhal", "--model", str(tiny_models["strong"]), "--data", str(data), "--images", str(images),
          "--out", str(out), *GEN])  # fmt: skip
    filled = json.loads(out.read_text())
    assert len(filled) == 3
    work = {int(r["id"]): r["text"] for r in read_jsonl(out.with_name("mmhal.work.jsonl"))}
    for i, (before, after) in enumerate(zip(template, filled, strict=True)):
        assert {k: v for k, v in after.items() if k != "model_answer"} == {
            k: v for k, v in before.items() if k != "model_answer"
        }
        assert after["model_answer"] == work[i]


def test_llava_bench_format(tmp_path: Path, sample_images: list[Path], tiny_models: dict[str, Path]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    questions = tmp_path / "questions.jsonl"
    lines = []
    for i, src in enumerate(sample_images[:3]):
        shutil.copy(src, images / f"{i + 1:03d}.jpg")
        lines.append(
            json.dumps(
                {
                    "image": f"{i + 1:03d}.jpg",
                    "text": f"What is in picture {i}?",
                    "category": "conv",
                    "question_id": i * 10,
                }
            )
        )
    questions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers" / "llava_bench.jsonl"
    main(["--benchmark", "llava_bench", "--model", str(tiny_models["qwen3vl"]), "--data", str(questions),
          "--images", str(images), "--out", str(out), *GEN])  # fmt: skip
    rows = read_jsonl(out)
    assert [r["question_id"] for r in rows] == [0, 10, 20]
    for i, row in enumerate(rows):
        assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert row["prompt"] == f"What is in picture {i}?" and row["model_id"] == "qwen3vl"
        assert isinstance(row["text"], str) and row["metadata"]["adapter"] is None
    assert len({r["answer_id"] for r in rows}) == 3


def test_coco_captions_with_adapter(tmp_path: Path, sample_images: list[Path], tiny_models: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    from capdpo.models.loading import load_vlm
    from capdpo.models.lora import lora_target_regex

    lm = load_vlm(str(tiny_models["strong"]), device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(lm.model), init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(lm.model, config).save_pretrained(adapter)

    images = tmp_path / "val2014"
    images.mkdir()
    for i, src in enumerate(sample_images[:4]):
        shutil.copy(src, images / f"COCO_val2014_{(i + 1) * 111:012d}.jpg")
    out = tmp_path / "answers" / "coco.json"
    main(["--benchmark", "coco", "--model", str(tiny_models["strong"]), "--adapter", str(adapter), "--images",
          str(images), "--num_images", "3", "--out", str(out), *GEN])  # fmt: skip
    rows = json.loads(out.read_text())
    assert len(rows) == 3 and all(set(r) == {"image_id", "caption"} for r in rows)
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(ids) and set(ids) < {111, 222, 333, 444}
    meta = json.loads(out.with_name("coco.meta.json").read_text())
    assert meta["config"]["answers"]["adapter"] == str(adapter)


def test_kill_and_rerun_answers_each_query_once(amber: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    """SIGKILL mid-run, rerun: every query answered exactly once, and the same answers as an uninterrupted run."""
    queries = json.loads(amber["queries"].read_text())
    queries += [{"id": i, "image": f"AMBER_{i - 3}.jpg", "query": "Describe this image briefly."} for i in (4, 5, 6)]
    amber["queries"].write_text(json.dumps(queries))
    args = [*amber_args(amber, tiny_models["strong"]), "--batch_size", "1", "--max_new_tokens", "24"]
    work = amber["out"].with_name("amber.work.jsonl")
    kept = kill_when("eval/answers.py", args, work, min_lines=2)
    assert 2 <= kept < 9 and not amber["out"].exists()
    done = run_script("eval/answers.py", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(work)]
    assert sorted(ids) == sorted(str(q["id"]) for q in queries) and len(ids) == len(set(ids)) == 9
    assert "resumed" in done.stdout

    reference = amber["out"].with_name("reference.json")
    uninterrupted = [a if a != str(amber["out"]) else str(reference) for a in args]
    main(uninterrupted)
    assert json.loads(amber["out"].read_text()) == json.loads(reference.read_text())
