import pytest

from capdpo.generation.batching import Output
from capdpo.jsonl import read_jsonl, write_jsonl
from capdpo.models.loading import load_vlm
from capdpo.sections import load_config
from capdpo.stages import validate_sentences as validate
from capdpo.validation.claims import ClaimCache, Decomposer, parse_model_claims, rule_claims
from capdpo.validation.config import ValidateConfig
from capdpo.validation.methods import combine_claims
from tests.pipeline import write_config, write_images_stage
from tests.stages.test_validate_sentences import _last_logprobs, _single_token_ids, write_variants


def _questions(sentence):
    return [(c["kind"], c["question"]) for c in rule_claims(sentence)]


def test_rule_claims_of_fixed_sentences():
    assert _questions("There is a large red triangle at the top left.") == [
        ("object", "Is there a triangle in the image?"),
        ("attribute", "Is there a large triangle in the image?"),
        ("attribute", "Is there a red triangle in the image?"),
        ("position", "Is there a triangle at the top left of the image?"),
    ]
    assert _questions("Two blue circles are next to a small square.") == [
        ("count", "Are there two circles in the image?"),
        ("attribute", "Are there blue circles in the image?"),
        ("object", "Is there a square in the image?"),
        ("attribute", "Is there a small square in the image?"),
        ("relation", "Is there a circle next to a square?"),
    ]
    assert _questions("A cat sits on the left of the sofa.") == [
        ("object", "Is there a cat in the image?"),
        ("object", "Is there a sofa in the image?"),
        ("relation", "Is there a cat on the left of a sofa?"),
    ]
    assert _questions("The box is brown and wooden.") == [
        ("object", "Is there a box in the image?"),
        ("attribute", "Is there a brown box in the image?"),
        ("attribute", "Is there a wooden box in the image?"),
    ]
    # nothing to split: the sentence itself is the one claim
    assert _questions("It looks calm.") == [("sentence", "Is it true that it looks calm?")]
    assert len(rule_claims("There is a large red triangle at the top left.", max_claims=2)) == 2


def test_model_claims_are_parsed_and_fall_back_to_rules(tmp_path):
    answer = "1. Is there a dog in the image?\n- Is the dog brown?\nThe dog is brown.\n2) Is there a dog in the image?"
    assert [c["question"] for c in parse_model_claims(answer)] == ["Is there a dog in the image?", "Is the dog brown?"]

    class FixedBackend:
        calls = 0

        def generate(self, batch, gen):
            FixedBackend.calls += 1
            assert all(r.image is None for r in batch) and gen.temperature == 0.0
            text = {"A brown dog.": answer, "A red ball.": "no questions here"}
            return [
                Output(r.key, text[r.messages[0]["content"][0]["text"].split("Sentence: ")[1]], [], "stop")
                for r in batch
            ]

    cfg = ValidateConfig(methods=["claims"])
    decomposer = Decomposer(cfg, "fixed-model", lambda: FixedBackend())
    cache = ClaimCache(tmp_path)
    assert decomposer.fill(cache, ["A brown dog.", "A red ball."], batch_size=1) == 2
    dog, ball = (cache.records[decomposer.key(s)] for s in ("A brown dog.", "A red ball."))
    assert dog["source"] == "model" and [c["question"] for c in dog["claims"]][1] == "Is the dog brown?"
    assert ball["source"] == "rules" and ball["claims"] == rule_claims("A red ball.", cfg.claims_max)
    # cached: a second fill (a new process reading the file) asks the model nothing
    assert Decomposer(cfg, "fixed-model", lambda: FixedBackend()).fill(ClaimCache(tmp_path), ["A red ball."], 4) == 0
    assert FixedBackend.calls == 2


def test_combine_claims_by_hand():
    scores = [0.9, 0.2, 0.6, 0.4]
    assert combine_claims(scores, "min") == {"score": 0.2, "false_claims": 2}
    assert combine_claims(scores, "mean")["score"] == pytest.approx(0.525)
    assert combine_claims(scores, "false_count")["score"] == pytest.approx(1 / 3)


def test_claim_scores_equal_plain_forward_passes(tmp_path, tiny_models, sample_images):
    run_dir = tmp_path / "run"
    records = write_variants(run_dir, write_images_stage(run_dir, sample_images[:1]), per_image=1)
    config = write_config(
        tmp_path / "run.yaml",
        run_dir,
        tiny_models,
        validate={"methods": ["claims"], "claims_decomposer": "rules", "claims_combine": "mean", "batch_size": 4},
    )
    validate.run(load_config("validate", ["--config", str(config)]))
    [scored] = read_jsonl(run_dir / "04_scores.jsonl")
    lm = load_vlm(str(tiny_models["weak"]))
    yes = _single_token_ids(lm.tokenizer, ["Yes", "yes", "YES"])
    no = _single_token_ids(lm.tokenizer, ["No", "no", "NO"])
    prompt = ValidateConfig().claims_prompt
    checked = 0
    for cand in scored["candidates"]:
        details = cand["details"]["claims"]
        assert [c["question"] for c in details["claims"]] == [c["question"] for c in rule_claims(cand["text"], 8)]
        for claim in details["claims"]:
            lp = _last_logprobs(lm, records[0]["image"], prompt.replace("{question}", claim["question"]))[-1]
            p_yes, p_no = lp[yes].exp().sum().item(), lp[no].exp().sum().item()
            assert claim["score"] == pytest.approx(p_yes / (p_yes + p_no), abs=1e-4)
            checked += 1
        mean = sum(c["score"] for c in details["claims"]) / len(details["claims"])
        assert cand["score"] == pytest.approx(mean, abs=1e-9)
    assert checked >= 6


def test_claims_stage_resumes_after_a_crash_in_decomposition(tmp_path, tiny_models, sample_images, monkeypatch):
    run_dir = tmp_path / "run"
    write_variants(run_dir, write_images_stage(run_dir, sample_images[:2]), per_image=1)
    config = write_config(
        tmp_path / "run.yaml",
        run_dir,
        tiny_models,
        validate={"methods": ["claims", "yesno"], "batch_size": 2, "claims_max_new_tokens": 8},
    )
    original = Decomposer._decompose
    calls = []

    def crash_on_second_batch(self, backend, sentences):
        calls.append(sentences)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, backend, sentences)

    monkeypatch.setattr(Decomposer, "_decompose", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        validate.run(load_config("validate", ["--config", str(config)]))
    cached = read_jsonl(run_dir / "04_scores.claims.jsonl")
    assert len(cached) == 2 and read_jsonl(run_dir / "04_scores.jsonl") == []
    monkeypatch.setattr(Decomposer, "_decompose", original)
    validate.run(load_config("validate", ["--config", str(config)]))
    cached = read_jsonl(run_dir / "04_scores.claims.jsonl")
    sentences = [r["sentence"] for r in cached]
    # the candidates: one original and two variants shared by both records -> 3 sentences, each decomposed once
    assert len(sentences) == len(set(sentences)) == 3
    assert all(r["decomposer"].endswith("strong") and "raw" in r for r in cached)  # the strong model answered
    scored = read_jsonl(run_dir / "04_scores.jsonl")
    assert len(scored) == 2 and (run_dir / "04_scores.done").exists()
    by_sentence = {r["sentence"]: r["claims"] for r in cached}
    for record in scored:
        for cand in record["candidates"]:
            got = [c["question"] for c in cand["details"]["claims"]["claims"]]
            assert got == [c["question"] for c in by_sentence[cand["text"]]]


def test_decomposition_through_an_endpoint_equals_the_local_model(tmp_path, tiny_models, sample_images):
    from tests.generation.model_server import ModelServer

    raw = {}
    for name in ("local", "served"):
        run_dir = tmp_path / name
        write_variants(run_dir, write_images_stage(run_dir, sample_images[:1]), per_image=1)
        settings = {"methods": ["claims"], "claims_max_new_tokens": 12, "batch_size": 4}
        if name == "local":
            config = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models, validate=settings)
            validate.run(load_config("validate", ["--config", str(config)]))
        else:
            with ModelServer(str(tiny_models["strong"])) as server:
                settings.update(claims_base_url=server.url, claims_decomposer="strong")
                config = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models, validate=settings)
                validate.run(load_config("validate", ["--config", str(config)]))
        cached = read_jsonl(run_dir / "04_scores.claims.jsonl")
        raw[name] = {r["sentence"]: (r["raw"], r["claims"]) for r in cached}
        assert len(cached) == 3
    assert raw["served"] == raw["local"]  # greedy answers of the same model, the same claims
    assert all(text for text, _ in raw["local"].values())
    assert read_jsonl(tmp_path / "served" / "04_scores.claims.jsonl")[0]["decomposer"].startswith("openai:")


def test_ranks_decompose_only_the_sentences_of_their_own_units(tmp_path, tiny_models, sample_images, monkeypatch):
    """Under torchrun each rank decomposes the candidates of the units it scores, not every unfinished one."""
    run_dir = tmp_path / "run"
    records = write_variants(run_dir, write_images_stage(run_dir, sample_images), per_image=2)
    for n, record in enumerate(records):  # every candidate sentence of its own
        record.update(sentence=f"A red ball lies on floor {n}.", variants=[f"{n + 2} blue balls.", f"{n + 2} cats."])
    write_jsonl(run_dir / "03_variants.jsonl", records)
    config = write_config(
        tmp_path / "run.yaml",
        run_dir,
        tiny_models,
        validate={"methods": ["claims"], "batch_size": 1, "claims_decomposer": "rules"},
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    decomposed = {}
    for rank in (1, 0):  # rank 0 merges once rank 1 is done
        monkeypatch.setenv("RANK", str(rank))
        validate.run(load_config("validate", ["--config", str(config)]))
        cache = [r["sentence"] for r in read_jsonl(run_dir / f"04_scores.claims.rank{rank}.jsonl")]
        assert len(cache) == len(set(cache))
        decomposed[rank] = set(cache)
        if rank == 1:
            own = read_jsonl(run_dir / "04_scores.rank1.jsonl")
            assert 0 < len(own) < len(sample_images) * 2
            assert decomposed[1] == {c["text"] for r in own for c in r["candidates"]}
    merged = read_jsonl(run_dir / "04_scores.jsonl")
    assert len(merged) == len(records)
    assert not decomposed[0] & decomposed[1]
    assert decomposed[0] | decomposed[1] == {c["text"] for r in merged for c in r["candidates"]}


def test_an_endpoints_key_goes_only_in_its_header_and_its_url_and_key_name_stay_out_of_the_ids(
    tmp_path, tiny_models, sample_images, monkeypatch, capsys
):
    """`claims_key_env`'s key is sent as the endpoint's bearer token and written or printed nowhere; the endpoint's
    URL and the key's variable name are how the decomposer is reached, so two runs that differ only there give
    the same record ids."""
    from tests.evaluation.stub_server import StubChatServer

    secret = "sk-claims-never-written-51c"
    monkeypatch.setenv("CAPDPO_CLAIMS_KEY", secret)
    monkeypatch.setenv("CAPDPO_OTHER_KEY", "sk-other-key")
    ids = {}
    for name, key_env in (("a", "CAPDPO_CLAIMS_KEY"), ("b", "CAPDPO_OTHER_KEY")):
        run_dir = tmp_path / name
        write_variants(run_dir, write_images_stage(run_dir, sample_images[:1]), per_image=1)
        with StubChatServer(lambda user: "1. The ball is red.\n2. The ball lies on the floor.") as stub:
            settings = {"methods": ["claims"], "claims_max_new_tokens": 12, "batch_size": 4,
                        "claims_base_url": stub.url, "claims_decomposer": "strong", "claims_key_env": key_env}  # fmt: skip
            config = write_config(tmp_path / f"{name}.yaml", run_dir, tiny_models, validate=settings)
            validate.run(load_config("validate", ["--config", str(config)]))
            sent = {r["headers"].get("Authorization") for r in stub.requests}
        assert sent == {f"Bearer {secret if name == 'a' else 'sk-other-key'}"}
        ids[name] = [r["id"] for r in read_jsonl(run_dir / "04_scores.jsonl")]
    assert ids["a"] and ids["a"] == ids["b"]
    printed = capsys.readouterr()
    assert secret not in printed.out and secret not in printed.err
    files = [f for f in (tmp_path / "a").rglob("*") if f.is_file()]
    assert len(files) > 5 and not [f.name for f in files if secret.encode() in f.read_bytes()]


def test_claims_settings_enter_the_record_ids_only_when_claims_is_listed(
    tmp_path, tiny_models, sample_images, monkeypatch
):
    """Runs without `claims` keep the ids they always had whatever the claims_* settings; with it, a setting that
    changes claims changes the ids, and how the decomposer is reached (URL, key variable) does not."""
    from capdpo.run import Stage

    class Planned(Exception):
        pass

    def planned_ids(self, ids):  # noqa: ANN001, ANN202 - stop where the stage has planned its records
        raise Planned(sorted(ids))

    monkeypatch.setattr(Stage, "open_output", planned_ids)
    run_dir = tmp_path / "run"
    write_variants(run_dir, write_images_stage(run_dir, sample_images[:1]), per_image=2)

    def ids(**settings):  # noqa: ANN003, ANN202
        config = write_config(tmp_path / "run.yaml", run_dir, tiny_models, validate=settings)
        with pytest.raises(Planned) as caught:
            validate.run(load_config("validate", ["--config", str(config)]))
        return caught.value.args[0]

    plain = ids(methods=["yesno"])
    assert len(plain) == 2
    assert ids(methods=["yesno"], claims_threshold=0.7, claims_max=3, claims_combine="mean") == plain
    assert ids(methods=["yesno"], batch_size=3) == plain  # speed only
    claims = ids(methods=["yesno", "claims"])
    assert set(claims).isdisjoint(plain)
    assert set(ids(methods=["yesno", "claims"], claims_threshold=0.7)).isdisjoint(claims)
    reached = ids(methods=["yesno", "claims"], claims_base_url="http://127.0.0.1:9/v1", claims_key_env="OTHER_KEY")
    assert reached == claims
