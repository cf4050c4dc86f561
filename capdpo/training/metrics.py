"""Training metrics kept on the device until they are logged.

TRL's trainers keep each metric as a list of floats per mode (`trainer._metrics[mode][name]`) and average the list
when they log. Reading a float from a GPU tensor waits for all the queued work: one `.item()` per metric per step
stops the host from running ahead of the device in the middle of every step. capdpo's own losses append device
tensors instead (`record_metrics`, `record_ratio`), and the trainer turns them into numbers with one copy just
before it logs (`settle_metrics`).
"""

from __future__ import annotations

from typing import Any


def record_metrics(trainer: Any, mode: str, values: dict[str, Any]) -> None:
    """Append each tensor's mean over all processes' values to `trainer._metrics[mode][name]`, on the device."""
    gather = trainer.accelerator.gather_for_metrics
    for name, value in values.items():
        trainer._metrics[mode][name].append(gather(value.detach()).float().mean())


def record_ratio(trainer: Any, mode: str, name: str, total: Any, count: Any) -> None:
    """Append (`total` summed over the processes) / (`count` summed over them), or 0 where the count is 0, to
    `trainer._metrics[mode][name]`, on the device: a mean over tokens that weighs every process by its tokens."""
    import torch

    gather = trainer.accelerator.gather_for_metrics
    total = gather(total.detach().float()).sum()
    count = gather(count.detach()).sum()
    trainer._metrics[mode][name].append(torch.where(count > 0, total / count.clamp(min=1), 0.0))


def reward_metrics(chosen_rewards: Any, rejected_rewards: Any, chosen_logps: Any, rejected_logps: Any) -> dict:
    """The per-pair values of DPO's reward and log-prob metrics, under TRL's names (for `record_metrics`)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }


def settle_metrics(metrics: dict[str, dict[str, list[Any]]]) -> None:
    """Replace every tensor in the metric lists (mode -> name -> values) by its number (an int for an integer
    tensor, such as a token count): one copy for all the floats and one for all the integers."""
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
    # integer tensors (token counts) in one int64 copy, so counts beyond float32's 2**24 stay exact
    groups = {torch.float32: [], torch.int64: []}
    for values, i in places:
        groups[torch.float32 if values[i].is_floating_point() else torch.int64].append((values, i))
    for dtype, group in groups.items():
        if not group:
            continue
        numbers = torch.stack([values[i].reshape(()).to(device, dtype) for values, i in group]).tolist()
        for (values, i), number in zip(group, numbers, strict=True):
            values[i] = number
