"""The model recipe end to end at smoke scale: untrained models built for the synthetic language, trained from
scratch with capdpo's SFT (vision tower included), saved loadable with their training-image list and recipe."""

from __future__ import annotations

import json

import torch


def test_smoke_build_trains_both_roles_from_scratch(tmp_path) -> None:
    from capdpo.models.loading import load_vlm
    from capdpo.synthetic.build import BUILD_SEED, build
    from capdpo.synthetic.world import read_split

    report = build(tmp_path, scale="smoke", device="cpu", keep_work=True)
    for role in ("strong", "weak"):
        folder = tmp_path / role
        recipe = json.loads((folder / "recipe.json").read_text())
        assert recipe["role"] == role and recipe["world_seed"] == BUILD_SEED and recipe["sft"]["steps"] == 2
        assert recipe["sft"]["method"] == "full" and report[role]["check"]["discriminative"]["questions"] > 0
        assert not (folder / "training_args.bin").exists()  # no pickles in a shipped model
        if role == "weak":  # first phase on object lists alone, then the whole mix from that model
            first, last = recipe["sft"]["phases"]
            assert first["phase"] == "first" and first["tasks"] == ["list"] and first["steps"] == 1
            assert last["tasks"] == "all" and recipe["sft"]["model"].endswith("weak_first/model")
        trained = load_vlm(str(folder), device="cpu").model.state_dict()
        initial = load_vlm(str(tmp_path / ".work_strong_weak" / f"{role}_init"), device="cpu").model.state_dict()
        patch = next(k for k in trained if "patch_embed" in k)
        assert not torch.equal(trained[patch], initial[patch])  # the vision tower was trained, not frozen
        train_ids = {i.id for i in read_split(tmp_path / ".work_strong_weak" / "world" / "train.jsonl")}
        assert set((folder / "training_images.txt").read_text().split()) == train_ids
    records = [
        json.loads(line) for line in (tmp_path / ".work_strong_weak" / "weak_sft.jsonl").read_text().splitlines()
    ]
    assert {r["task"] for r in records} >= {"list", "yesno", "question", "rating", "pairwise"}
    assert "describe" not in {r["task"] for r in records}  # the weak model never learns the describe prompt


def test_a_rerun_reuses_finished_phases_and_extends_with_new_ones(tmp_path, capsys) -> None:
    """A rerun into the same folder retrains nothing that finished; a recipe with one more phase trains only it."""
    from dataclasses import replace

    from capdpo.synthetic import build as B

    smoke = B.SCALES["smoke"]
    B.build(tmp_path, scale="smoke", device="cpu", keep_work=True, roles=("weak",))
    work = tmp_path / ".work_weak"
    first_model = (work / "weak_sft" / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()

    longer = replace(smoke.weak, phases=(*smoke.weak.phases, B.Phase("more", 2)))
    B.SCALES["extended"] = replace(smoke, weak=longer)
    try:
        report = B.build(tmp_path, scale="extended", device="cpu", keep_work=True, roles=("weak",))
    finally:
        del B.SCALES["extended"]
    out = capsys.readouterr().out
    assert out.count("finished earlier with the same data and settings") == 2  # first, sft
    assert (work / "weak_sft" / "model" / "model.safetensors").read_bytes() == first_model
    phases = report["weak"]["sft"]["phases"]
    assert [p["phase"] for p in phases] == ["first", "sft", "more"] and phases[-1]["steps"] == 2
    assert phases[-1]["model"].endswith("weak_sft/model")  # the new phase starts from the reused model
    assert (tmp_path / "weak" / "model.safetensors").read_bytes() != first_model
