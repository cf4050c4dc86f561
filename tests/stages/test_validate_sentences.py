import math

import pytest
import torch
from PIL import Image

from capdpo.jsonl import read_jsonl, write_jsonl
from capdpo.models.loading import load_vlm
from capdpo.sections import load_config
from capdpo.stages import validate_sentences as validate
from capdpo.validation.config import ValidateConfig
from capdpo.validation.methods import AnswerTokens, Pairwise
from tests.helpers import kill_when, run_script
from tests.pipeline import write_config, write_images_stage


def write_variants(run_dir, images, per_image=2):
    records = []
    for i, image in enumerate(images):
        for s in range(per_image):
            records.append(
                {
                    "id": f"var{i}_{s}",
                    "image_id": image["id"],
                    "image": image["path"],
                    "description_id": f"desc{i}",
                    "prompt": "Describe this image in detail.",
                    "index": s,
                    "sentence": f"A red ball lies on the floor {s}.",
                    "context": ["A red ball lies on the floor 0.", "A red ball lies on the floor 1."],
                    "variants": ["A blue ball lies on the floor.", "Two cats sleep on a sofa."],
                    "generation": {},
                }
            )
    write_jsonl(run_dir / "03_variants.jsonl", records)
    (run_dir / "03_variants.done").write_text("{}\n")
    return records


def _single_token_ids(tok, words):
    ids = set()
    for w in words:
        for form in (w, " " + w):
            enc = tok.encode(form, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)


def _last_logprobs(lm, image_path, text, continuation=()):
    """One plain forward pass, no batching or padding: the independent reference."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = lm.processor(text=[prompt], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    if continuation:
        extra = torch.tensor([list(continuation)])
        enc["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        return torch.log_softmax(lm.model(**enc).logits[0].double(), -1)


def test_yesno_and_rating_scores_equal_independent_forward_passes(tmp_path, tiny_models, sample_images, monkeypatch):
    from capdpo.generation.engine import Engine
    from capdpo.generation.prefix import SharedPrefixScorer

    run_dir = tmp_path / "run"
    records = write_variants(run_dir, write_images_stage(run_dir, sample_images[:2]), per_image=1)
    config = write_config(
        tmp_path / "run.yaml",
        run_dir,
        tiny_models,
        validate={"methods": ["yesno", "rating"], "weights": [3.0, 1.0], "images_per_pass": 1},
    )
    kept = []  # the stage moves only the ids its methods read off the device
    score = Engine.score
    monkeypatch.setattr(Engine, "score", lambda self, *a, **k: kept.append(k.get("keep")) or score(self, *a, **k))
    prefixes = []  # images per prefix pass: the setting reaches the scorer
    prefill = SharedPrefixScorer._prefill
    monkeypatch.setattr(
        SharedPrefixScorer, "_prefill", lambda self, chunk: prefixes.append(len(chunk)) or prefill(self, chunk)
    )
    validate.run(load_config("validate", ["--config", str(config)]))
    assert kept and all(k is not None and 6 <= len(k) < 200 for k in kept)
    assert prefixes == [1, 1]
    scored = read_jsonl(run_dir / "04_scores.jsonl")
    assert len(scored) == 2
    lm = load_vlm(str(tiny_models["weak"]))
    tok = lm.tokenizer
    yes, no = _single_token_ids(tok, ["Yes", "yes", "YES"]), _single_token_ids(tok, ["No", "no", "NO"])
    cfg = ValidateConfig()
    by_variant = {r["id"]: r for r in records}
    for record in scored:
        source = by_variant[record["variants_id"]]
        texts = [c["text"] for c in record["candidates"]]
        assert texts == [source["sentence"], *source["variants"]]
        assert [c["is_original"] for c in record["candidates"]] == [True, False, False]
        for cand in record["candidates"]:
            lp = _last_logprobs(lm, source["image"], cfg.yesno_prompt.replace("{sentence}", cand["text"]))[-1]
            p_yes, p_no = lp[yes].exp().sum().item(), lp[no].exp().sum().item()
            assert cand["details"]["yesno"]["score"] == pytest.approx(p_yes / (p_yes + p_no), abs=1e-4)
            # rating: brute force over all 101 numbers, each teacher-forced on its own
            weights = {}
            prompt = cfg.rating_prompt.replace("{sentence}", cand["text"])
            digits = sorted({t for n in range(101) for t in tok.encode(str(n), add_special_tokens=False)})
            for n in range(101):
                path = tok.encode(str(n), add_special_tokens=False)
                lp_path = _last_logprobs(lm, source["image"], prompt, path)
                rows = lp_path[-len(path) - 1 :]
                logp = sum(rows[j][t].item() for j, t in enumerate(path))
                extendable = any(str(m).startswith(str(n)) and m != n for m in range(101))
                stop = 1 - rows[-1][digits].exp().sum().item() if extendable else 1.0
                weights[n] = math.exp(logp) * stop
            expected = sum(n * w for n, w in weights.items()) / sum(weights.values())
            assert cand["details"]["rating"]["expected"] == pytest.approx(expected, abs=1e-3)
            combined = 0.75 * cand["details"]["yesno"]["score"] + 0.25 * cand["details"]["rating"]["score"]
            assert cand["score"] == pytest.approx(combined, abs=1e-9)


def test_pairwise_counts_only_consistent_verdicts():
    method = Pairwise.__new__(Pairwise)
    method.a, method.b = AnswerTokens(("A",), [0]), AnswerTokens(("B",), [1])

    def rows(p_a):
        return torch.log(torch.tensor([[p_a, 1 - p_a, 1e-9]]))

    # candidate 0 wins against 1 in both orders; 0 vs 2 disagree by position; 1 loses to 2 in both orders
    results = {
        (0, 1): rows(0.9), (1, 0): rows(0.2),
        (0, 2): rows(0.8), (2, 0): rows(0.7),
        (1, 2): rows(0.3), (2, 1): rows(0.6),
    }  # fmt: skip
    out = method.scores(["x", "y", "z"], results)
    assert [(d["wins"], d["losses"], d["inconsistent"]) for d in out] == [(1, 0, 1), (0, 2, 0), (1, 0, 1)]
    assert [d["score"] for d in out] == [0.75, 0.0, 0.75]


def test_validation_is_deterministic_and_crash_safe(tmp_path, tiny_models, sample_images):
    outputs = {}
    for name in ("ref", "crash"):
        run_dir = tmp_path / name
        write_variants(run_dir, write_images_stage(run_dir, sample_images), per_image=2)
        cfg = write_config(
            tmp_path / f"{name}.yaml",
            run_dir,
            tiny_models,
            validate={"methods": ["yesno", "pairwise"], "batch_size": 2},
        )
        if name == "ref":
            assert run_script("4_validate_sentences.py", "--config", str(cfg)).returncode == 0
        else:
            kill_when("4_validate_sentences.py", ["--config", str(cfg)], run_dir / "04_scores.jsonl", 2)
            result = run_script("4_validate_sentences.py", "--config", str(cfg))
            assert result.returncode == 0, result.stderr
        outputs[name] = read_jsonl(run_dir / "04_scores.jsonl")
    assert len(outputs["crash"]) == len({r["id"] for r in outputs["crash"]}) == 12
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(outputs["crash"], key=key) == sorted(outputs["ref"], key=key)
    for record in outputs["ref"]:
        for cand in record["candidates"]:
            assert 0.0 <= cand["score"] <= 1.0 and set(cand["details"]) == {"yesno", "pairwise"}


def test_bad_input_is_a_one_line_error_naming_the_file_line_and_field(tmp_path, tiny_models, sample_images, capsys):
    """Missing, unfinished or malformed variants and a missing model: exit code 2, one line naming the culprit,
    and no record written."""
    from tests.helpers import check_bad_inputs

    run_dir = tmp_path / "run"
    variants = write_variants(run_dir, write_images_stage(run_dir, sample_images[:2]))
    config = write_config(tmp_path / "run.yaml", run_dir, tiny_models)
    check_bad_inputs(validate.main, capsys, config, run_dir / "03_variants.jsonl", variants, "variants",
                     "weak_model", "04_scores")  # fmt: skip


def test_two_ranks_share_the_work_and_merge_into_the_single_process_result(tmp_path, tiny_models, sample_images):
    from tests.helpers import check_ranks_merge

    configs = {}
    for name in ("single", "sharded"):
        run_dir = tmp_path / name
        write_variants(run_dir, write_images_stage(run_dir, sample_images[:4]))
        configs[name] = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models)
    check_ranks_merge("4_validate_sentences.py", configs, "04_scores", 4 * 2)
