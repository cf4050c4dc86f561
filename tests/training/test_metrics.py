"""Metrics kept on the device until they are logged (capdpo.training.metrics)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


def _trainer(world: int = 1) -> SimpleNamespace:
    # gather_for_metrics of `world` processes holding the same values: the values repeated
    accelerator = SimpleNamespace(gather_for_metrics=lambda t: torch.cat([t.reshape(-1)] * world))
    return SimpleNamespace(accelerator=accelerator, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


def test_recorded_metrics_stay_tensors_until_settled_then_equal_the_means():
    from capdpo.training.metrics import record_metrics, settle_metrics

    trainer = _trainer(world=2)
    rewards = torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16)
    accurate = torch.tensor([True, False, True])
    record_metrics(trainer, "train", {"rewards/chosen": rewards, "rewards/accuracies": accurate.float()})
    record_metrics(trainer, "train", {"rewards/chosen": rewards * 2})
    record_metrics(trainer, "eval", {"rewards/chosen": -rewards})
    trainer._metrics["train"]["entropy"].append(0.25)  # TRL's own metrics arrive as floats

    train, evaluation = trainer._metrics["train"], trainer._metrics["eval"]
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in train["rewards/chosen"] + evaluation["rewards/chosen"])
    settle_metrics(trainer._metrics)
    assert train["rewards/chosen"] == [0.5, 1.0] and evaluation["rewards/chosen"] == [-0.5]
    assert train["rewards/accuracies"] == [pytest.approx(2 / 3, abs=1e-7)]
    assert train["entropy"] == [0.25]
    values = [v for by_name in trainer._metrics.values() for vs in by_name.values() for v in vs]
    assert all(type(v) is float for v in values)
    settle_metrics(trainer._metrics)  # nothing left to copy: unchanged
    assert train["rewards/chosen"] == [0.5, 1.0]


def test_settling_reads_the_device_once(monkeypatch):
    from capdpo.training.metrics import record_metrics, settle_metrics

    trainer = _trainer()
    for step in range(5):
        record_metrics(trainer, "train", {"a": torch.full((4,), float(step)), "b": torch.ones(2) * step})
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or original(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("item() called")))
    settle_metrics(trainer._metrics)
    assert reads == [torch.Size([10])]
    assert trainer._metrics["train"]["a"] == [0.0, 1.0, 2.0, 3.0, 4.0] == trainer._metrics["train"]["b"]
