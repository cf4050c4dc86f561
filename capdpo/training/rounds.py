"""Iterative rounds (RLAIF-V style): each round's trained policy is the next round's strong model.

    bash scripts/run_rounds.sh configs/demo.yaml 3
    python -m capdpo prepare-round --config configs/demo.yaml --round 2     # writes and prints round 2's config

Round k runs every stage in `<run_dir>/round<k>/` with a config derived from the base config, written there as
`round.yaml`:

* round 1: the base config with `run_dir: <run_dir>/round1`;
* round k > 1: also `strong_adapter:` round k-1's trained policy (`policy` in its `06_train/summary.json`). With
  LoRA that is one adapter on the unchanged `strong_model` holding every earlier round's update; with full
  fine-tuning it is round k-1's `06_train/model/`, which becomes `strong_model` (and no adapter).

With `strong_adapter` set, stages 2 and 3 generate with the adapter merged into the strong model (their record
ids and `model` fields carry its content hash), and stage 6 merges it before adding the new LoRA: the new adapter
trains on top of the previous policy, and the reference is that policy, as in RLAIF-V's iterative scheme (each
round's reference is the model that produced the round's data). Stage 6 then composes the two into one adapter
(`capdpo.models.adapters.compose_adapters`), `06_train/policy_adapter/`: its update is exactly ΔW_previous + ΔW_new, stored as a LoRA whose rank is the sum of
the two (the rank grows by `lora_r` per round; merged, it costs nothing). Evaluate a round with
`eval/answers.py --model <strong_model> --adapter <run_dir>/round<k>/06_train/policy_adapter` (round 1: `adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from capdpo.config import CommonConfig, option, read_yaml
from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import read_json, write_text
from capdpo.sections import validate_config_file

ROUND_CONFIG = "round.yaml"


# ---- round configs ------------------------------------------------------------------------------------------
def round_dir(base_run_dir: str | Path, k: int) -> Path:
    """Where round k of a run lives."""
    return Path(base_run_dir) / f"round{k}"


def trained_policy(run_dir: Path) -> Path:
    """The policy a finished stage 6 left in `run_dir`: an adapter on strong_model, or a full model folder."""
    done = run_dir / "06_train.done"
    if not done.is_file():
        raise InputError(f"{run_dir}: stage 6 has not finished there (no {done.name}); finish that round first")
    summary = read_json(run_dir / "06_train" / "summary.json")
    policy = (summary.get("policy") or summary.get("saved")) if isinstance(summary, dict) else None
    if not policy or not Path(policy).is_dir():
        raise InputError(f"{run_dir / '06_train' / 'summary.json'}: names no existing trained policy ({policy!r})")
    return Path(policy)


def prepare_round(config: str | Path, k: int) -> Path:
    """Write round k's config (`<run_dir>/round<k>/round.yaml`) from the base config and round k-1's policy.

    Args:
        config: the base run YAML (its `run_dir` holds the rounds).
        k: the round, from 1.

    Returns:
        The written config file.

    Raises:
        ConfigError: a bad base config or round number.
        InputError: round k-1 has not finished training.
    """
    if k < 1:
        raise ConfigError(f"--round: {k} — rounds count from 1")
    validate_config_file(config)
    data = read_yaml(config)
    base_run_dir = data.get("run_dir", CommonConfig.run_dir)
    derived = {**data, "run_dir": str(round_dir(base_run_dir, k))}
    origin = "the base config"
    if k > 1:
        policy = trained_policy(round_dir(base_run_dir, k - 1))
        if (policy / "adapter_config.json").is_file():
            derived["strong_adapter"] = str(policy)
        else:  # full fine-tuning saved a whole model
            derived["strong_model"] = str(policy)
            derived["strong_adapter"] = ""
        origin = f"round {k - 1}'s trained policy {policy}"
    path = Path(derived["run_dir"]) / ROUND_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Round {k} of {config}: the base config with run_dir {derived['run_dir']} and the strong model from "
        f"{origin}.\n# Written by `python -m capdpo prepare-round --config {config} --round {k}`; run it with "
        f"`bash scripts/run_all.sh {path}`.\n"
    )
    write_text(path, header + yaml.safe_dump(derived, sort_keys=False, allow_unicode=True))
    validate_config_file(path)
    return path


@dataclass
class RoundOptions:
    """`python -m capdpo prepare-round`: write round k's config and print its path."""

    config: str = option("The base run YAML.", "")
    round: int = option("Round number (1, 2, ...).", 0)


def main(argv: list[str] | None = None) -> None:
    from capdpo.cli import parse_options, run_cli

    def _run(args: list[str] | None) -> None:
        opts = parse_options(RoundOptions, args, __doc__.split("\n\n")[0], required=("config",))
        print(prepare_round(opts.config, opts.round))

    run_cli(_run, argv)
