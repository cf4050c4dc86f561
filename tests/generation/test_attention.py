import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from capdpo.generation.attention import FOLDED_SDPA, fold_mask, folded_attention, folded_sdpa_attention


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups", [1, 4])
def test_folded_attention_equals_the_library_sdpa(groups):
    torch.manual_seed(0)
    batch, kv_heads, queries, keys, dim = 3, 2, 5, 11, 8
    query = torch.randn(batch, kv_heads * groups, queries, dim)
    key, value = torch.randn(2, batch, kv_heads, keys, dim).unbind(0)
    # every row its own pattern: left padding before a prefix, then a causal suffix, with one padded key
    mask = torch.ones(batch, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
    mask[0, ..., :2] = False
    mask[1, ..., 4] = False
    module = _Attention(groups).eval()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)
    got, _ = folded_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5)
    assert got.shape == expected.shape == (batch, queries, kv_heads * groups, dim)
    assert (got - expected).abs().max().item() < 1e-6
    # the mask folded once by the caller (additive, one block of queries per head of a group): the same numbers
    folded = fold_mask(mask, groups, query.dtype)
    assert folded.shape == (batch, 1, groups * queries, keys) and folded.dtype == query.dtype
    assert torch.equal(folded[:, :, -queries:] == 0, mask)
    again, _ = folded_sdpa_attention(module, query, key, value, folded, scaling=dim**-0.5)
    assert (again - expected).abs().max().item() < 1e-6
    if groups > 1:
        with pytest.raises(ValueError, match="expected 5 or 20"):
            folded_sdpa_attention(module, query, key, value, folded[:, :, :-1], scaling=dim**-0.5)
    # query head h reads key/value head h // groups: reading them interleaved gives other numbers
    if groups > 1:
        swapped = query.view(batch, kv_heads, groups, queries, dim).transpose(1, 2).reshape(query.shape)
        wrong, _ = folded_sdpa_attention(module, swapped, key, value, mask, scaling=dim**-0.5)
        assert (wrong - expected).abs().max().item() > 1e-2


def test_folded_attention_switches_only_sdpa_and_restores_it():
    class Config:
        _attn_implementation = "sdpa"

    config = Config()
    with folded_attention(config) as folded:
        assert folded and config._attn_implementation == FOLDED_SDPA
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "flash_attention_2"
    with folded_attention(config) as folded:
        assert not folded and config._attn_implementation == "flash_attention_2"
    config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError), folded_attention(config):
        raise RuntimeError("boom")
    assert config._attn_implementation == "sdpa"
