import json

import pytest

from capdpo.jsonl import read_jsonl
from capdpo.sections import load_config
from capdpo.stages import generate_descriptions as describe
from capdpo.text import split_sentences
from tests.helpers import kill_when, run_script
from tests.pipeline import write_config, write_images_stage


@pytest.fixture
def run_setup(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    images = write_images_stage(run_dir, sample_images[:3])
    config = write_config(tmp_path / "run.yaml", run_dir, tiny_models)
    return run_dir, config, images


def test_describe_end_to_end(run_setup):
    run_dir, config, images = run_setup
    stats = describe.run(load_config("describe", ["--config", str(config)]))
    records = read_jsonl(run_dir / "02_descriptions.jsonl")
    assert len(records) == 3 * 2 == stats["descriptions"]
    assert len({r["id"] for r in records}) == 6
    assert {r["image_id"] for r in records} == {i["id"] for i in images}
    for r in records:
        assert r["prompt"] == "Describe this image in detail."
        assert r["generation"]["max_new_tokens"] == 32 and r["generation"]["sample"] in (0, 1)
        # sentences are the text's sentences, minus a last one cut by the token limit
        all_sentences = split_sentences(r["text"])
        if r["dropped_tail"]:
            assert r["finish_reason"] == "length" and all_sentences[-1] == r["dropped_tail"]
            assert r["sentences"] == all_sentences[:-1]
        else:
            assert r["sentences"] == all_sentences
    # the two samples of one image differ (distinct seeds)
    by_image = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r["text"])
    assert any(len(set(texts)) > 1 for texts in by_image.values())
    for name in (
        "02_descriptions.done",
        "02_descriptions.meta.json",
        "02_descriptions.stats.json",
        "02_descriptions.errors.jsonl",
    ):
        assert (run_dir / name).exists(), name
    meta = json.loads((run_dir / "02_descriptions.meta.json").read_text())
    assert meta["config"]["describe"]["max_new_tokens"] == 32 and "transformers" in meta["versions"]


def test_rerun_skips_finished_work_and_a_changed_config_never_mixes(run_setup):
    run_dir, config, _ = run_setup
    describe.run(load_config("describe", ["--config", str(config)]))
    before = (run_dir / "02_descriptions.jsonl").read_bytes()
    stats = describe.run(load_config("describe", ["--config", str(config)]))
    assert stats["resumed"] == 6 and (run_dir / "02_descriptions.jsonl").read_bytes() == before
    result = run_script("2_generate_descriptions.py", "--config", str(config), "--max_new_tokens", "8")
    assert result.returncode == 2 and "use a new run_dir" in result.stderr
    assert (run_dir / "02_descriptions.jsonl").read_bytes() == before


def test_decode_window_reaches_the_decoder_and_leaves_the_records_unchanged(
    run_setup, tmp_path, sample_images, monkeypatch
):
    """`describe.decode_window` only changes how many cache positions a decode step reads, `describe.decode_kernel`
    how a step attends: the same records."""
    import capdpo.generation.static_decoder as static

    run_dir, config, _ = run_setup
    describe.run(load_config("describe", ["--config", str(config)]))
    windows = []
    init = static.StaticDecoder.__init__
    monkeypatch.setattr(
        static.StaticDecoder,
        "__init__",
        lambda self, *a, **k: windows.append((k["window_step"], k["decode_kernel"])) or init(self, *a, **k),
    )
    other = tmp_path / "windowed"
    write_images_stage(other, sample_images[:3])
    flags = ["--config", str(config), "--run_dir", str(other), "--decode_window", "3", "--decode_kernel", "false"]
    describe.run(load_config("describe", flags))
    assert windows == [(3, False)]  # the kernel ruled out (by default None: on where it runs, CUDA with Triton)

    def texts(folder):
        return sorted((r["id"], r["text"]) for r in read_jsonl(folder / "02_descriptions.jsonl"))

    assert texts(other) == texts(run_dir) and len(texts(run_dir)) == 6


def test_crash_and_rerun_gives_every_id_once_and_the_same_records(tmp_path, tiny_models, sample_images):
    reference_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    for d in (reference_dir, crash_dir):
        write_images_stage(d, sample_images)
    sections = {"describe": {"batch_size": 1, "samples_per_image": 2, "max_new_tokens": 24}}
    ref_cfg = write_config(tmp_path / "ref.yaml", reference_dir, tiny_models, **sections)
    crash_cfg = write_config(tmp_path / "crash.yaml", crash_dir, tiny_models, **sections)
    assert run_script("2_generate_descriptions.py", "--config", str(ref_cfg)).returncode == 0
    out = crash_dir / "02_descriptions.jsonl"
    killed_at = kill_when("2_generate_descriptions.py", ["--config", str(crash_cfg)], out, 3)
    assert 3 <= killed_at < 12 and not (crash_dir / "02_descriptions.done").exists()
    # a torn last line, as a kill mid-write leaves it, is dropped and redone
    with out.open("a") as fh:
        fh.write('{"id": "torn", "image')
    result = run_script("2_generate_descriptions.py", "--config", str(crash_cfg))
    assert result.returncode == 0, result.stderr
    crashed = read_jsonl(out)
    reference = read_jsonl(reference_dir / "02_descriptions.jsonl")
    assert len(crashed) == len({r["id"] for r in crashed}) == 12
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(crashed, key=key) == sorted(reference, key=key)


def test_unfinished_or_missing_input_and_missing_model_are_one_line_errors(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run_dir, tiny_models)
    result = run_script("2_generate_descriptions.py", "--config", str(config))
    assert result.returncode == 2 and "01_images.jsonl: not found" in result.stderr
    write_images_stage(run_dir, sample_images[:2], done=False)
    result = run_script("2_generate_descriptions.py", "--config", str(config))
    assert result.returncode == 2 and "has not finished" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (run_dir / "01_images.done").write_text("{}\n")
    result = run_script(
        "2_generate_descriptions.py", "--config", str(config), "--strong_model", str(tmp_path / "no_model")
    )
    assert result.returncode == 2 and "strong_model" in result.stderr and "no_model" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_two_ranks_share_the_work_and_merge_into_the_single_process_result(tmp_path, tiny_models, sample_images):
    from tests.helpers import run_ranks

    single_dir, sharded_dir = tmp_path / "single", tmp_path / "sharded"
    for d in (single_dir, sharded_dir):
        write_images_stage(d, sample_images[:4])
    single = write_config(tmp_path / "single.yaml", single_dir, tiny_models, describe={"batch_size": 2})
    sharded = write_config(tmp_path / "sharded.yaml", sharded_dir, tiny_models, describe={"batch_size": 2})
    assert run_script("2_generate_descriptions.py", "--config", str(single)).returncode == 0
    run_ranks("2_generate_descriptions.py", sharded)
    merged = read_jsonl(sharded_dir / "02_descriptions.jsonl")
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(merged, key=key) == sorted(read_jsonl(single_dir / "02_descriptions.jsonl"), key=key)
    assert (sharded_dir / "02_descriptions.done").exists()
    assert not list(sharded_dir.glob("02_descriptions.rank*"))


def test_empty_input_missing_image_and_missing_field_name_the_file_and_line(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", run_dir, tiny_models)
    run_dir.mkdir()
    (run_dir / "01_images.jsonl").write_text("")
    (run_dir / "01_images.done").write_text("{}\n")
    empty = run_script("2_generate_descriptions.py", "--config", str(config))
    assert (
        empty.returncode == 2
        and "01_images.jsonl: holds no records" in empty.stderr
        and "--allow_empty" in empty.stderr
    )
    assert not (run_dir / "02_descriptions.done").exists()

    records = write_images_stage(run_dir, sample_images[:3])
    gone = tmp_path / "gone.png"
    gone.write_bytes(sample_images[0].read_bytes())
    records[2]["path"] = str(gone)
    (run_dir / "01_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    gone.unlink()
    missing = run_script("2_generate_descriptions.py", "--config", str(config))
    assert missing.returncode == 2 and f"01_images.jsonl:3: image {gone} not found" in missing.stderr

    del records[1]["sha256"]
    (run_dir / "01_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    broken = run_script("2_generate_descriptions.py", "--config", str(config))
    assert broken.returncode == 2 and "01_images.jsonl:2: missing field(s) sha256" in broken.stderr
    for result in (empty, missing, broken):
        assert len(result.stderr.strip().splitlines()) == 1
