import pytest

from capdpo.jsonl import read_jsonl, write_jsonl
from capdpo.sections import load_config
from capdpo.stages import regenerate_sentences as variants
from capdpo.text import FIRST_SENTENCE_CONTEXT, clean_variant, dedupe_variants, normalise, rewrite_prompt
from tests.helpers import kill_when, run_script
from tests.pipeline import write_config, write_images_stage


def write_descriptions(run_dir, images, n_sentences=3):
    records = []
    for i, image in enumerate(images):
        sentences = [
            f"A red ball lies on the floor {i}.",
            "A dog sits near a wooden chair.",
            "The sky is blue and clear.",
        ][:n_sentences]
        records.append(
            {
                "id": f"desc{i}",
                "image_id": image["id"],
                "image": image["path"],
                "prompt": "Describe this image in detail.",
                "text": " ".join(sentences),
                "sentences": sentences,
                "model": "tiny",
                "generation": {},
            }
        )
    write_jsonl(run_dir / "02_descriptions.jsonl", records)
    (run_dir / "02_descriptions.done").write_text("{}\n")
    return records


@pytest.fixture
def run_setup(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    images = write_images_stage(run_dir, sample_images[:2])
    descriptions = write_descriptions(run_dir, images)
    return run_dir, write_config(tmp_path / "run.yaml", run_dir, tiny_models), descriptions


def test_prompt_holds_the_sentences_before_and_the_sentence():
    context = ["First one.", "Second one.", "Third one."]
    template = "So far: {context} | Rewrite: {sentence}"
    assert rewrite_prompt(template, context, 2) == "So far: First one. Second one. | Rewrite: Third one."
    assert rewrite_prompt(template, context, 0) == f"So far: {FIRST_SENTENCE_CONTEXT} | Rewrite: First one."


def test_dedupe_drops_empty_repeats_and_the_original():
    kept = dedupe_variants("A dog sits.", ["a dog sits", "", "A cat sits.", "A cat sits!", "Two dogs sit."])
    assert kept == ["A cat sits.", "Two dogs sit."]


def test_variants_end_to_end(run_setup):
    run_dir, config, descriptions = run_setup
    stats = variants.run(load_config("variants", ["--config", str(config)]))
    records = read_jsonl(run_dir / "03_variants.jsonl")
    assert len(records) == 2 * 3 == stats["sentences"]
    by_desc = {d["id"]: d for d in descriptions}
    for r in records:
        desc = by_desc[r["description_id"]]
        assert r["sentence"] == desc["sentences"][r["index"]] and r["context"] == desc["sentences"]
        assert r["image_id"] == desc["image_id"] and r["prompt"] == desc["prompt"]
        assert len(r["raw_variants"]) == 3 and len(r["generation"]["seeds"]) == 3
        # variants are exactly the cleaned, distinct, non-original raw outputs, in order
        assert r["variants"] == dedupe_variants(r["sentence"], [clean_variant(t) for t in r["raw_variants"]])
        assert normalise(r["sentence"]) not in {normalise(v) for v in r["variants"]}
    assert stats["variants_kept"] == sum(len(r["variants"]) for r in records)


def test_crash_and_rerun_gives_every_id_once_and_the_same_records(tmp_path, tiny_models, sample_images):
    outputs = {}
    for name in ("ref", "crash"):
        run_dir = tmp_path / name
        write_descriptions(run_dir, write_images_stage(run_dir, sample_images[:4]))
        cfg = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models, variants={"batch_size": 3, "k": 3})
        if name == "ref":
            assert run_script("3_regenerate_sentences.py", "--config", str(cfg)).returncode == 0
        else:
            kill_when("3_regenerate_sentences.py", ["--config", str(cfg)], run_dir / "03_variants.jsonl", 2)
            result = run_script("3_regenerate_sentences.py", "--config", str(cfg))
            assert result.returncode == 0, result.stderr
        outputs[name] = read_jsonl(run_dir / "03_variants.jsonl")
    assert len(outputs["crash"]) == len({r["id"] for r in outputs["crash"]}) == 12
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(outputs["crash"], key=key) == sorted(outputs["ref"], key=key)
