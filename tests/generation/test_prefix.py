import pytest
import torch

from capdpo.generation.engine import Engine
from capdpo.generation.prefix import SharedPrefixScorer, shared_prefix_length
from capdpo.generation.rope import mrope_positions
from capdpo.models.loading import load_vlm
from capdpo.validation.config import ValidateConfig
from capdpo.validation.validator import Validator


def test_shared_prefix_leaves_every_read_position_in_the_suffix():
    ids = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 5, 6]]
    assert shared_prefix_length(ids, [0, 0, 0]) == 3
    assert shared_prefix_length(ids, [0, 0, 2]) == 3  # the third prompt ends at 4 tokens: read position 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], [0, 0]) == 2
    # a row that parts early from the first is not outvoted by a later row that parts late
    assert shared_prefix_length([[1, 2, 3, 4, 5, 6], [1, 7, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9]], [0, 0, 0]) == 1
    # rows known to share their first tokens: compared from there on, the same answers
    rows = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 8], [1, 2, 3, 4, 5, 6, 7, 9]]
    assert [shared_prefix_length(rows, [0, 0, 0], known=k) for k in (0, 2, 4)] == [5, 5, 5]
    assert shared_prefix_length(ids, [0, 0, 0], known=3) == shared_prefix_length(ids, [0, 0, 0]) == 3


@pytest.mark.parametrize("arch", ["weak", "qwen3vl", "llava"])
def test_shared_prefix_scores_equal_full_forward_passes(tiny_models, sample_images, arch, monkeypatch):
    import capdpo.generation.attention as attention_module
    import capdpo.generation.prefix as prefix_module
    from capdpo.generation.attention import folded_sdpa_attention

    computed = []  # Qwen-VL prefixes take their 3-D positions from capdpo.generation.rope, not the model's loop

    def spy(model, inputs):
        result = mrope_positions(model, inputs)
        computed.append(result is not None)
        return result

    monkeypatch.setattr(prefix_module, "mrope_positions", spy)
    folded_heads = []  # suffix passes on SDPA read grouped key/value heads without copying them per query head

    def folded_spy(module, query, key, value, mask, *args, **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        # the mask arrives folded and additive, made once per pass rather than once per layer
        assert mask.dtype == query.dtype and mask.shape[2] == groups * query.shape[2]
        folded_heads.append(groups)
        return folded_sdpa_attention(module, query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(attention_module, "folded_sdpa_attention", folded_spy)
    layer_kinds = set()  # each suffix pass gathers the rows' prefixes layer by layer, straight into their keys
    rows_layer = prefix_module._rows_layer

    def rows_layer_spy(layer, rows):
        made = rows_layer(layer, rows)
        layer_kinds.add(type(made))
        return made

    monkeypatch.setattr(prefix_module, "_rows_layer", rows_layer_spy)
    lm = load_vlm(str(tiny_models[arch]))
    validator = Validator(lm, ValidateConfig(methods=["yesno", "rating", "pairwise"]))
    candidates = ["A red ball.", "Two dogs play on the grass near a tall tree.", "The sky."]
    # five images of different sizes (different numbers of image tokens), more than one prefill pass holds
    jobs = [j for i in range(5) for j in validator.jobs(f"s{i}", str(sample_images[i]), candidates)]
    requests = [j.request for j in jobs]
    single = [r for r in validator.jobs("lonely", str(sample_images[5]), ["Just one."]) if r.method == "yesno"]
    requests.append(single[0].request)  # an image with one request takes the plain path
    assert len({r.image for r in requests}) == 6 and any(r.continuation for r in requests)
    engine = Engine(lm)
    plain = {r.key: lp for r, lp in zip(requests, engine.forward_logprobs(requests))}
    shared = SharedPrefixScorer(lm, images_per_pass=2).score(requests, batch_size=7)
    assert set(shared) == set(plain)
    for key, expected in plain.items():
        assert shared[key].shape == expected.shape
        assert (shared[key] - expected).abs().max().item() < 1e-4, key
    assert computed == ([] if arch == "llava" else [True] * len(computed)) and (arch == "llava" or computed)
    assert lm.model.model.language_model.config._attn_implementation == "sdpa"
    assert folded_heads and max(folded_heads) == (1 if arch == "llava" else 2)  # llava's tiny text model has no GQA
    assert layer_kinds == {prefix_module._rows_on_prefixes()}
    # only the ids the methods read leave the device: the same numbers at those ids, whichever path scores them
    keep = validator.reads()
    assert keep and len(keep) < lm.model.get_output_embeddings().weight.shape[0] // 4
    picked_shared = SharedPrefixScorer(lm, images_per_pass=2).score(requests, batch_size=7, keep=keep)
    picked_plain = engine.score(requests, batch_size=7, shared_prefix=False, keep=keep)
    assert set(picked_shared) == set(picked_plain) == set(plain)
    for key, expected in plain.items():
        for picked in (picked_shared[key], picked_plain[key]):
            assert picked.values.shape == (expected.shape[0], len(keep)) and len(picked) == expected.shape[0]
            for j in range(len(picked)):
                assert (picked[j][keep] - expected[j][keep]).abs().max().item() < 1e-4, key
                assert float(picked[j][keep[-1]]) == pytest.approx(float(expected[j][keep[-1]]), abs=1e-4)
    same_batch = engine.forward_logprobs(requests, keep)  # the very numbers of `plain`, at the kept ids
    assert all(torch.equal(p.values, plain[r.key][:, keep]) for r, p in zip(requests, same_batch))


def test_picked_logprobs_refuse_ids_that_were_not_kept():
    from capdpo.generation.prefix import Picker

    full = torch.log_softmax(torch.randn(3, 50), dim=-1)
    picker = Picker([7, 3, 41], vocab=50)
    rows = picker.rows(picker.to_host(full))
    assert torch.equal(rows[1][[3, 41]], full[1][[3, 41]]) and float(rows[2][7]) == float(full[2][7])
    with pytest.raises(KeyError, match="not among the ids kept"):
        rows[0][[3, 4]]
    whole = Picker(None, vocab=50)
    assert whole.rows(whole.to_host(full)) is not None and torch.equal(whole.rows(whole.to_host(full)), full)


def test_images_are_tokenised_ahead_of_the_gpu_and_a_bad_image_still_raises(tiny_models, sample_images, tmp_path):
    """A worker thread prepares the next images' groups while the model runs on the current ones: here the fifth
    image's tokenisation waits until the first prefill has begun, which tokenising every image before scoring never
    allows. An image that cannot be read raises from `score` as before, and no worker is left running."""
    import threading

    lm = load_vlm(str(tiny_models["weak"]))
    validator = Validator(lm, ValidateConfig(methods=["yesno"]))
    candidates = ["A red ball.", "Two dogs.", "The sky."]
    requests = [j.request for i in range(6) for j in validator.jobs(f"s{i}", str(sample_images[i]), candidates)]
    scorer = SharedPrefixScorer(lm, images_per_pass=2)
    grouped, started = [], threading.Event()
    group, prefill = scorer._group, scorer._prefill

    def group_spy(image, requests_of_image):
        if len(grouped) == 4:
            assert started.wait(timeout=20), "every image was tokenised before the model ran"
        grouped.append(image)
        return group(image, requests_of_image)

    def prefill_spy(chunk):
        started.set()
        return prefill(chunk)

    scorer._group, scorer._prefill = group_spy, prefill_spy
    results = scorer.score(requests, batch_size=4)
    assert set(results) == {r.key for r in requests} and started.is_set()
    assert grouped == [str(p) for p in sample_images[:6]]  # in the requests' order

    missing = tmp_path / "missing.png"
    broken = [j.request for j in validator.jobs("s9", str(missing), candidates)]
    before = threading.active_count()
    with pytest.raises(Exception) as raised:
        SharedPrefixScorer(lm, images_per_pass=2).score(requests[:6] + broken + requests[6:], batch_size=4)
    assert "missing.png" in str(raised.value)
    assert threading.active_count() == before


def test_scoring_starts_with_small_prefix_passes_and_doubles_them(tiny_models, sample_images, monkeypatch):
    """While the host prepares images, the first prefix passes are small and double up to `images_per_pass`; the
    scores are those of full forward passes whatever the passes hold."""
    import capdpo.generation.prefix as prefix_module

    monkeypatch.setattr(prefix_module, "FIRST_PASS_IMAGES", 1)
    lm = load_vlm(str(tiny_models["weak"]))
    validator = Validator(lm, ValidateConfig(methods=["yesno"]))
    candidates = ["A red ball.", "Two dogs play on the grass.", "The sky."]
    requests = [j.request for i in range(6) for j in validator.jobs(f"s{i}", str(sample_images[i]), candidates)]
    scorer = SharedPrefixScorer(lm, images_per_pass=4)
    passes = []
    prefill = scorer._prefill
    monkeypatch.setattr(scorer, "_prefill", lambda chunk: passes.append(len(chunk)) or prefill(chunk))
    shared = scorer.score(requests, batch_size=5)
    assert passes == [1, 2, 3]  # 1, 2, then up to 4: the three images left
    plain = {r.key: lp for r, lp in zip(requests, Engine(lm).forward_logprobs(requests))}
    assert set(shared) == set(plain)
    assert all((shared[k] - plain[k]).abs().max().item() < 1e-4 for k in plain)
    passes.clear()  # groups given ready-made (no host work to wait for): full passes from the start
    groups = [
        g
        for _, g in scorer._prepared(
            [(r.image, [r2 for r2 in requests if r2.image == r.image]) for r in requests[::3]]
        )
    ]
    scorer.score_groups(groups, batch_size=5)
    assert passes == [4, 2]
