"""Training metrics kept on the device until they are logged.

TRL's trainers keep each metric as a list of floats per mode (`trainer._metrics[mode][name]`) and average the list
when they log. Reading a float from a GPU tensor waits for all the queued work: one `.item()` per metric per step
stops the host from running ahead of the device in the middle of every step. capdpo's own losses append device
tensors instead (`record_metrics`), and the trainer turns them into floats with one copy just before it logs
(`settle_metrics`).
"""

from __future__ import annotations

from typing import Any


def record_metrics(trainer: Any, mode: str, values: dict[str, Any]) -> None:
    """Append each tensor's mean over all processes' values to `trainer._metrics[mode][name]`, on the device."""
    gather = trainer.accelerator.gather_for_metrics
    for name, value in values.items():
        trainer._metrics[mode][name].append(gather(value.detach()).float().mean())


def settle_metrics(metrics: dict[str, dict[str, list[Any]]]) -> None:
    """Replace every tensor in the metric lists (mode -> name -> values) by its float, with one copy for all."""
    import torch

    places = [
        (values, i)
        for by_name in metrics.values()
        for values in by_name.values()
        for i, value in enumerate(values)
        if torch.is_tensor(value)
    ]
    if not places:
        return
    device = places[0][0][places[0][1]].device
    numbers = torch.stack([values[i].reshape(()).to(device, torch.float32) for values, i in places]).tolist()
    for (values, i), number in zip(places, numbers, strict=True):
        values[i] = number
