"""ZeRO's overflow check and gradient norm, made fast, answer as DeepSpeed's own methods on every kind of gradient
list."""

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

    from capdpo.training.zero import fast_zero_reductions, library_zero_reductions, partition_has_overflow

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
        assert fast_zero_reductions()
        assert DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial is partition_has_overflow
        assert fast_zero_reductions()  # idempotent
    finally:
        assert library_zero_reductions()  # DeepSpeed's own check back
    assert DeepSpeedZeroOptimizer.__dict__["has_overflow_partitioned_grads_serial"] is original
    empty = SimpleNamespace(bit16_groups=[[]], averaged_gradients={0: [None]})
    assert not bool(partition_has_overflow(empty))


@pytest.mark.parametrize("poison", [None, "inf", "nan"])
@pytest.mark.parametrize("model_parallel_rank", [0, 1])
def test_fast_grad_norm_equals_deepspeeds(monkeypatch, poison, model_parallel_rank):
    """Padding left out, pipeline replicas left out, model-parallel tensors counted on every rank and the others
    only on rank 0, non-finite totals masked: the same norm as DeepSpeed's per-tensor loop."""
    import deepspeed.comm
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from capdpo.training.zero import fast_zero_reductions, library_zero_reductions, partition_grad_norm

    monkeypatch.setattr(deepspeed.comm, "all_reduce", lambda *args, **kwargs: None)  # one process: a sum of one
    original = DeepSpeedZeroOptimizer.__dict__["get_grad_norm_direct"]
    g = torch.Generator().manual_seed(0)
    padding = torch.randn(9, generator=g) * 100
    padding._zero_padding = True
    grads = [
        torch.randn(64, 8, generator=g).bfloat16(),
        torch.randn(300, generator=g),
        padding,
        torch.randn(5, 5, generator=g).bfloat16() * 10,
        torch.randn(10, generator=g) * 3,
        torch.randn(4, generator=g),
    ]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(5)]  # one per gradient that is not padding
    params[2].ds_pipe_replicated = True  # a pipeline replica (grads[3])
    params[3].model_parallel = True  # a model-parallel tensor (grads[4])
    if poison is not None:
        grads[1][-1] = float(poison)
    optimizer = SimpleNamespace(
        model_parallel_rank=model_parallel_rank,
        dp_process_group=None,
        device="cpu",
        _model_parallel_all_reduce=lambda tensor, op: None,
    )
    expected = original(optimizer, grads, params)
    got = partition_grad_norm(optimizer, grads, params)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-6), (got, expected)
    by_hand = torch.stack([grads[i].double().norm() for i in ((0, 1, 4, 5) if model_parallel_rank == 0 else (4,))])
    if poison is None:
        assert torch.allclose(got.double(), by_hand.pow(2).sum().sqrt(), rtol=1e-6)
    assert torch.equal(
        partition_grad_norm(optimizer, grads, params, float("inf")), original(optimizer, grads, params, float("inf"))
    )
    try:
        assert fast_zero_reductions()
        assert DeepSpeedZeroOptimizer.get_grad_norm_direct is partition_grad_norm
        assert torch.equal(
            partition_grad_norm(optimizer, grads, params, float("inf")),
            original(optimizer, grads, params, float("inf")),
        )
    finally:
        assert library_zero_reductions()
    assert DeepSpeedZeroOptimizer.__dict__["get_grad_norm_direct"] is original
