"""ZeRO's overflow check, made fast, answers as DeepSpeed's own check on every kind of gradient list."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")


@pytest.mark.parametrize(
    "poison",
    [None, ("inf", 0), ("-inf", 2), ("nan", 1), ("nan", 4), ("inf", 5)],
)
def test_fast_overflow_check_answers_as_deepspeed(poison):
    from deepspeed.runtime.utils import has_inf_or_nan
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from capdpo.training.zero import fast_overflow_check, library_overflow_check, partition_has_overflow

    original = DeepSpeedZeroOptimizer.__dict__["has_overflow_partitioned_grads_serial"]
    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(64, 8, generator=g).bfloat16(),
        torch.randn(8, 64, generator=g).bfloat16() * 1e30,  # huge but finite: no overflow
        torch.randn(300, generator=g),
        torch.zeros(0),
        torch.randn(5, 5, generator=g).half(),
        torch.randn(7, generator=g),
    ]
    if poison is not None:
        value, index = poison
        grads[index].view(-1)[-1] = float(value)
    optimizer = SimpleNamespace(
        bit16_groups=[[0, 1, 2], [3, 4, 5]],
        averaged_gradients={0: grads[:3] + [None], 1: grads[3:]},
        _has_inf_or_nan=has_inf_or_nan,
    )
    expected = original(optimizer)
    got = partition_has_overflow(optimizer)
    assert got.dtype == torch.bool and got.shape == (1,)
    assert bool(got) == bool(expected) == (poison is not None)
    try:
        assert fast_overflow_check()
        assert DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial is partition_has_overflow
        assert fast_overflow_check()  # idempotent
    finally:
        assert library_overflow_check()  # DeepSpeed's own check back
    assert DeepSpeedZeroOptimizer.__dict__["has_overflow_partitioned_grads_serial"] is original
    empty = SimpleNamespace(bit16_groups=[[]], averaged_gradients={0: [None]})
    assert not bool(partition_has_overflow(empty))
