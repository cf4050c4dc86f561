import pytest

from capdpo.jsonl import read_jsonl, write_jsonl
from capdpo.sections import load_config
from capdpo.stages import regenerate_sentences as variants
from capdpo.text import FIRST_SENTENCE_CONTEXT, clean_variant, content_key, dedupe_variants, normalise, rewrite_prompt
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


def test_rewrites_differ_in_content_words_not_in_function_words_or_form():
    original = "There is a red circle on the left."
    candidates = [
        "A red circle is on the left!",  # the same claim in other function words: a copy
        "The red circle on the left.",  # a copy again
        "There is no red circle on the left.",  # negation is content
        "There is a red circle under the left.",  # so is the preposition
        "There are two red circles on the left.",  # and the number
        "THERE IS A RED CIRCLE ON THE LEFT",  # case and punctuation only
    ]
    assert dedupe_variants(original, candidates) == candidates[2:5]
    assert content_key("There is a red circle.") == content_key("A red circle") == ("red", "circle")
    seen: set = set()
    assert dedupe_variants(original, ["A blue square."], seen) == ["A blue square."]
    assert dedupe_variants(original, ["a blue square", "A green star."], seen) == [
        "A green star."
    ]  # earlier rounds count


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
        assert len(r["raw_variants"]) == len(r["generation"]["seeds"]) == sum(x["samples"] for x in r["rounds"])
        assert r["rounds"][0]["samples"] == 3  # round 1 asks for k; a later round for the missing usable ones
        # variants are exactly the cleaned, distinct, non-original raw outputs of all rounds, in order
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


class ScriptedBackend:
    """A backend that writes copies of the sentence in round 1 and numbered rewrites later: the rounds logic
    without a model. Records every request it gets."""

    def __init__(self) -> None:
        self.requests: list = []
        self.temperatures: list[float] = []

    def plan(self, requests, batch_size):
        return [list(requests)]

    def generate(self, batch, gen):
        from capdpo.generation.batching import Output

        self.requests += batch
        self.temperatures.append(gen.temperature)
        outputs = []
        for request in batch:
            text = request.messages[0]["content"][-1]["text"].split("Sentence: ")[1].split("\n")[0]
            parts = request.key.split(":")
            if len(parts) == 3:  # a later round: a rewrite naming its round and index
                text = f"A green shape number {parts[1]}{parts[2]} is here."
            outputs.append(Output(request.key, text, [], "stop"))
        return outputs


@pytest.mark.parametrize("max_rounds", [1, 3])
def test_sentences_short_of_k_rewrites_are_asked_again_in_warmer_rounds(run_setup, monkeypatch, max_rounds):
    from capdpo.generation import backends

    run_dir, config, _ = run_setup
    fake = ScriptedBackend()
    monkeypatch.setitem(backends.BACKENDS, "local", lambda common, role, section, **options: fake)
    args = ["--config", str(config), "--k", "3", "--max_rounds", str(max_rounds), "--round_temperature_step", "0.5"]
    stats = variants.run(load_config("variants", args))
    records = read_jsonl(run_dir / "03_variants.jsonl")
    assert len(records) == 6
    for r in records:
        if max_rounds == 1:  # round 1 wrote only copies of the sentence: nothing is kept, nothing is asked again
            assert r["variants"] == [] and len(r["raw_variants"]) == 3
            assert r["rounds"] == [{"round": 1, "temperature": 1.0, "samples": 3, "added": 0}]
            continue
        # round 2 asks for the 3 missing rewrites and gets them; round 3 is not needed
        assert r["variants"] == [f"A green shape number 2{j} is here." for j in range(3)]
        assert [x["round"] for x in r["rounds"]] == [1, 2] and [x["added"] for x in r["rounds"]] == [0, 3]
        assert r["rounds"][1]["temperature"] == 1.5 and len(r["generation"]["seeds"]) == len(r["raw_variants"]) == 6
        assert len(set(r["generation"]["seeds"])) == 6  # every sample of every round has its own seed
    assert stats["added_by_round"] == ([0] if max_rounds == 1 else [0, 18, 0])
    assert stats["usable_per_sentence_round1"] == 0 and stats["usable_per_sentence"] == (0 if max_rounds == 1 else 3)
    assert fake.temperatures == ([1.0] * 3 if max_rounds == 1 else [1.0, 1.5] * 3)  # three units of 2 sentences
    # the record ids of a one-round run are those of the versions before rounds existed; more rounds change them
    ids = {r["id"] for r in records}
    if max_rounds == 1:
        from dataclasses import asdict

        from capdpo.generation.sampling import Generation
        from capdpo.jsonl import stable_id

        cfg = load_config("variants", args)
        old = {**asdict(Generation.from_section(cfg.section)), "k": 3, "prompt": cfg.section.prompt}
        expected = {
            stable_id("variants", r["description_id"], r["index"], r["sentence"], r["model"], old, cfg.common.seed)
            for r in records
        }
        assert ids == expected
    (run_dir / "x").mkdir()
    for name in ("02_descriptions.jsonl", "02_descriptions.done"):
        (run_dir / "x" / name).write_bytes((run_dir / name).read_bytes())
    other = variants.run(load_config("variants", [*args[:-4], "--max_rounds", "2", "--run_dir", str(run_dir / "x")]))
    assert other["sentences"] == 6 and ids.isdisjoint(
        {r["id"] for r in read_jsonl(run_dir / "x" / "03_variants.jsonl")}
    )


def test_bad_input_is_a_one_line_error_naming_the_file_line_and_field(run_setup, capsys):
    """Missing, unfinished or malformed descriptions and a missing model: exit code 2, one line naming the culprit,
    and no record written."""
    from tests.helpers import check_bad_inputs

    run_dir, config, descriptions = run_setup
    source = run_dir / "02_descriptions.jsonl"
    check_bad_inputs(variants.main, capsys, config, source, descriptions, "sentences", "strong_model", "03_variants")


def test_two_ranks_share_the_work_and_merge_into_the_single_process_result(tmp_path, tiny_models, sample_images):
    """Sampled rewrites too: each request's seed is its own, so the ranks' records are the single run's."""
    from tests.helpers import check_ranks_merge

    configs = {}
    for name in ("single", "sharded"):
        run_dir = tmp_path / name
        write_descriptions(run_dir, write_images_stage(run_dir, sample_images[:4]))
        configs[name] = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models, variants={"batch_size": 4})
    check_ranks_merge("3_regenerate_sentences.py", configs, "03_variants", 4 * 3)
