"""Stage 6: DPO training of the strong model on the preference pairs (LoRA on the language model by default).

    python 6_train_dpo.py --config configs/demo.yaml [--method full --loss_type unidpo --max_steps 100 ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 \\
        6_train_dpo.py --config run.yaml

Reads `05_pairs.jsonl` (refusing an unfinished one unless --allow_partial; `pairs_file` names another file in
the same format) and trains on the `train` split, evaluating on `val` (`capdpo.training.dpo`: checks, reference
pass, trainer).

Outputs, in `<run_dir>/`:
  06_train/adapter/      LoRA adapter + processor (full fine-tuning: 06_train/model/)
  06_train/policy_adapter/  with strong_adapter: it and this round's adapter composed into one
  06_train/merged/       base model with the adapter merged in (with `merge: true`)
  06_train/checkpoints/  resumable checkpoints; rerunning the same command continues from the last one
  06_train/log.jsonl     one record per logged step (loss, rewards/accuracies, rewards/margins, ...)
  06_train/summary.json  final loss, reward accuracy and margins, eval metrics, speed, reference pass
  06_train.meta.json, 06_train.config.yaml, 06_train.stats.json, 06_train.done   as for every stage
"""

from __future__ import annotations

from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.sections import load_config
from capdpo.training.dpo import run_dpo


def run(cfg: LoadedConfig) -> Any:
    """Train; returns the outcome (trainer, summary, output folder, saved adapter)."""
    return run_dpo(cfg)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("train", a, __doc__.split("\n\n")[0])), argv)
