"""Does the weak-to-strong loop lower hallucination? Stages 1-6 on the synthetic world, evaluated before and after.

    python -m capdpo experiment --seeds 3 --parallel 3 --out runs/synthetic   # GPU: minutes
    python -m capdpo experiment --seeds 1 --scale ci --configs main shuffled --out /tmp/x

For each seed: a fresh world (`pairs` images for the pipeline, `test` images for evaluation; neither shares an
image with the other or with the models' training images, which stage 1 excludes by hash). Stages 1-3 run once
(the strong model describes the pairs images and rewrites every sentence); then each configuration runs stages
4-6 in its own run directory (stage 4 results are reused between configurations that score identically), and
the trained adapter is evaluated on the test images against the untrained strong model.

Configurations (one change each from `main` = weak model, yesno, context pairs, sigmoid DPO):
  rating, pairwise   stage 4 method
  self_critique      the strong model scores its own candidates (yesno)
  sentence           stage 5 pair mode
  unidpo             stage 6 loss
  rpo                stage 6 loss: DPO plus the SFT loss on the chosen side (weights 1 and 1)
  apo                stage 6 loss: APO-zero (raises the chosen side's likelihood, lowers the rejected side's)
  shuffled           control: each pair's chosen and rejected swapped with probability 1/2 before training
  unfiltered         stage 5 without the chosen-score filter (min_chosen_score 0)
  unfiltered_shuffled  the shuffled control of `unfiltered`
  unfiltered_rpo     `unfiltered` with the `rpo` loss
  claims             stage 4 method: claim-level yes/no (rule-based decomposition), the least credible claim counts
  claims_false_count `claims` scored by the number of claims judged false (RLAIF-V)
  mdpo               stage 6 loss: sigmoid DPO plus mDPO's image-conditional term and anchor (random-crop images)
  mdpo_shuffled      the shuffled control of `mdpo`

Outputs in `--out`: `seed<N>/<config>/` (run directories with every stage's files), `seed<N>/eval/<config>/`
(descriptions, answers, metrics), `results.json` (every number), `results.md` (mean ± std over seeds, pair
accuracy against the ground truth, whether the targets hold on every seed) and `chair_i.png`.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options, run_cli
from capdpo.config import option, require_choice, require_known
from capdpo.jsonl import write_json
from capdpo.pipeline import STAGES, run_stage
from capdpo.pipeline import stage as stage_info
from capdpo.synthetic.world import DESCRIBE_PROMPT, Scene, generate_world

_RPO_LOSS = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}
CONFIGS: dict[str, dict[str, Any]] = {
    "main": {},
    "rating": {"validate": {"methods": ["rating"]}},
    "pairwise": {"validate": {"methods": ["pairwise"]}},
    "self_critique": {"validator": "strong"},
    "sentence": {"pairs": {"mode": "sentence"}},
    "unidpo": {"train": {"loss_type": ["unidpo"]}},
    "rpo": {"train": _RPO_LOSS},
    "apo": {"train": {"loss_type": ["apo_zero"]}},
    "shuffled": {"shuffle": True},
    "unfiltered": {"pairs": {"min_chosen_score": 0.0}},
    "unfiltered_shuffled": {"pairs": {"min_chosen_score": 0.0}, "shuffle": True},
    "unfiltered_rpo": {"pairs": {"min_chosen_score": 0.0}, "train": _RPO_LOSS},
    # the tiny strong model only describes and rewrites, so the word-list rules split sentences into claims
    "claims": {"validate": {"methods": ["claims"], "claims_decomposer": "rules"}},
    "claims_false_count": {
        "validate": {"methods": ["claims"], "claims_decomposer": "rules", "claims_combine": "false_count"}
    },
    "mdpo": {"train": {"loss_type": ["sigmoid", "mdpo"]}},
    "mdpo_shuffled": {"train": {"loss_type": ["sigmoid", "mdpo"]}, "shuffle": True},
}
# Targets of the experiment (issue 7): after one round, CHAIR_i down by >= 30% relative with coverage down by no
# more than 5 points, on every seed.
TARGET_RELATIVE_CHAIR_I_DROP = 0.30
TARGET_MAX_COVERAGE_DROP = 5.0


@dataclass
class Scale:
    """How big one seed's experiment is."""

    pairs_images: int
    test_images: int
    samples_per_image: int = 2
    k: int = 4
    dpo_epochs: float = 3.0
    dpo_max_steps: int = 0
    dpo_batch_size: int = 8
    dpo_learning_rate: float = 2e-4  # 1e-3 and 5e-4 raised CHAIR_i on the cpu scale (LoRA r16, 3 epochs)
    lora_r: int = 16
    batch_size: int = 64  # generation / scoring batch
    min_gap: float = 0.2
    min_chosen_score: float = 0.8  # stage 5: pair only where the verifier accepts the chosen side (0.0 raised CHAIR_i)
    variant_rounds: int = 1  # stage 3's max_rounds (every committed result was measured with one round)
    round_temperature_step: float = 0.25


SCALES = {
    # 8 descriptions per image give ~130 pairs per seed; 4 epochs (at 2 the DPO loss ends at 0.66, barely learned;
    # docs/synthetic/results_full_h200_strong3.md); 1000 test images keep the evaluation's noise small.
    "full": Scale(pairs_images=500, test_images=1000, samples_per_image=8, dpo_epochs=4.0),
    "cpu": Scale(pairs_images=120, test_images=80, batch_size=32),
    # what tests/synthetic/test_signal.py runs (about a minute per seed on 2 CPU cores for two configurations)
    "ci": Scale(pairs_images=96, test_images=200, samples_per_image=4, batch_size=32, dpo_epochs=10.0),
}


def scale_with(scale: Scale, changes: list[str]) -> Scale:
    """`scale` with `FIELD=VALUE` changes applied (values converted to the field's type)."""
    from capdpo.errors import ConfigError

    types = {f.name: type(getattr(scale, f.name)) for f in fields(Scale)}
    values = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in types:
            raise ConfigError(f"--set {change}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise ConfigError(f"--set {change}: {value!r} is not a valid {types[key].__name__}") from None
    return replace(scale, **values)


@dataclass
class Settings:
    """One experiment run."""

    out: Path
    models: Path
    seeds: list[int]
    scale: Scale
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    device: str = "auto"
    parallel: int = 1  # seeds run at once, each in its own process
    scale_name: str = "full"


def training_image_lists(models: Path) -> list[Path]:
    """The `training_images.txt` files of the strong and weak models (those that have one)."""
    return [p for p in (models / role / "training_images.txt" for role in ("strong", "weak")) if p.exists()]


def training_image_ids(models: Path) -> set[str]:
    """The ids of every image the strong and weak models were trained on."""
    return {image_id for path in training_image_lists(models) for image_id in path.read_text().split()}


def run_yaml(run_dir: Path, settings: Settings, seed: int, config: str, world: Path) -> Path:
    """The run YAML of one configuration (what a user would write), saved in its run directory."""
    import yaml

    scale = settings.scale
    change = CONFIGS[config]
    strong = str((settings.models / "strong").resolve())
    weak = strong if change.get("validator") == "strong" else str((settings.models / "weak").resolve())
    sections: dict[str, Any] = {
        "images": {
            "source": "folder",
            "path": str((world / "pairs").resolve()),
            "extensions": [".png"],
            "exclude": [
                *(str(p.resolve()) for p in training_image_lists(settings.models)),
                str(world / "test_ids.txt"),
            ],
        },
        "describe": {
            "prompts": [DESCRIBE_PROMPT],
            "samples_per_image": scale.samples_per_image,
            "max_new_tokens": 96,
            "temperature": 1.0,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "batch_size": scale.batch_size,
        },
        "variants": {
            "k": scale.k,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_rounds": scale.variant_rounds,
            "round_temperature_step": scale.round_temperature_step,
            "batch_size": scale.batch_size,
        },
        "validate": {"methods": ["yesno"], "batch_size": scale.batch_size},
        "pairs": {
            "mode": "context",
            "min_gap": scale.min_gap,
            "min_chosen_score": scale.min_chosen_score,
            "max_pairs_per_image": 8,
            "val_fraction": 0.1,
            "exports": [],
        },
        "train": {
            "method": "lora",
            "lora_r": scale.lora_r,
            "lora_alpha": 2 * scale.lora_r,
            "learning_rate": scale.dpo_learning_rate,
            "warmup_ratio": 0.1,
            "batch_size": scale.dpo_batch_size,
            "gradient_accumulation_steps": 1,
            "epochs": scale.dpo_epochs or 1.0,
            "max_steps": scale.dpo_max_steps,
            "max_length": 512,
            "gradient_checkpointing": False,
            "save_steps": 10_000,
            "logging_steps": 5,
            "ref_batch_size": scale.batch_size,
        },
    }
    for section in ("validate", "pairs", "train"):
        sections[section].update(change.get(section, {}))
    if change.get("shuffle"):
        sections["train"]["pairs_file"] = str(run_dir / "05_pairs.shuffled.jsonl")
    config_data = {
        "run_dir": str(run_dir),
        "seed": seed,
        "strong_model": strong,
        "weak_model": weak,
        "device": settings.device,
        "dtype": "float32",  # the tiny models were trained in fp32; keep CPU and GPU runs comparable
        **sections,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.yaml"
    path.write_text(
        f"# synthetic experiment: seed {seed}, configuration '{config}'\n"
        f"#   python -m capdpo experiment --seeds ... --out {settings.out}\n"
        + yaml.safe_dump(config_data, sort_keys=False)
    )
    return path


def _stage(section: str, config: Path) -> Any:
    """Run one stage on `config`, as its numbered script would."""
    return run_stage(section, ["--config", str(config)])


def _copy_stage_files(source: Path, target: Path, prefixes: tuple[str, ...]) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name.startswith(prefixes):
            shutil.copy2(path, target / path.name)


def shuffle_pairs(pairs_file: Path, target: Path, seed: int) -> int:
    """Write `target`: the pairs with chosen and rejected (and their scores) swapped with probability 1/2."""
    from capdpo.jsonl import iter_jsonl, write_jsonl

    rng = random.Random(f"capdpo-shuffle:{seed}")
    out, swapped = [], 0
    for record in iter_jsonl(pairs_file):
        if rng.random() < 0.5:
            record = {
                **record,
                "chosen": record["rejected"],
                "rejected": record["chosen"],
                "score_chosen": record["score_rejected"],
                "score_rejected": record["score_chosen"],
            }
            swapped += 1
        out.append(record)
    write_jsonl(target, out)
    return swapped


def pair_accuracy(pairs_file: Path, scenes: dict[str, Scene]) -> dict[str, Any]:
    """How often a pair's chosen side is truly better than its rejected side (fewer wrong claims), by ground truth."""
    from capdpo.jsonl import iter_jsonl
    from capdpo.synthetic.scoring import wrong_claims

    better = worse = tie = 0
    for pair in iter_jsonl(pairs_file):
        scene = scenes[pair["image_id"]]
        a, b = wrong_claims(pair["chosen"], scene)[0], wrong_claims(pair["rejected"], scene)[0]
        better += a < b
        worse += a > b
        tie += a == b
    n = better + worse + tie
    return {
        "pairs": n,
        "chosen_better": round(100 * better / n, 1) if n else 0.0,
        "chosen_worse": round(100 * worse / n, 1) if n else 0.0,
        "ties": round(100 * tie / n, 1) if n else 0.0,
    }


def run_seed(settings: Settings, seed: int) -> dict[str, Any]:
    """Stages 1-6 for every configuration of one seed, plus the before/after evaluations."""
    from capdpo.synthetic.evaluate import EvalSettings, evaluate_model, test_questions

    root = settings.out / f"seed{seed}"
    world_dir = root / "world"
    # neither model's training images may reach the pipeline or the evaluation
    trained_on = training_image_ids(settings.models)
    world = generate_world(
        world_dir,
        {"pairs": settings.scale.pairs_images, "test": settings.scale.test_images},
        seed=10_000 + seed,
        exclude=trained_on,
    )
    (world_dir / "test_ids.txt").write_text("".join(f"{i.id}\n" for i in world["test"]))
    scenes = {i.id: i.scene for split in world.values() for i in split}
    questions = test_questions(world["test"], seed)
    eval_settings = EvalSettings(batch_size=settings.scale.batch_size, device=settings.device)
    timings: dict[str, float] = {}

    started = time.time()
    base = root / "shared"
    base_yaml = run_yaml(base, settings, seed, "main", world_dir)
    shared = STAGES[:3]  # every configuration shares the images, descriptions and variants
    for info in shared:
        _stage(info.section, base_yaml)
    timings["stages_1_3"] = round(time.time() - started, 1)

    before = evaluate_model(
        str(settings.models / "strong"), world["test"], questions, root / "eval" / "before", None, eval_settings
    )
    out: dict[str, Any] = {"seed": seed, "before": _headline(before), "configs": {}, "timings": timings}
    scored: dict[str, Path] = {}  # stage 4 settings -> the run directory that holds them
    for config in settings.configs:
        started = time.time()
        run_dir = root / config
        run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = run_yaml(run_dir, settings, seed, config, world_dir)
        _copy_stage_files(base, run_dir, tuple(info.stem for info in shared))
        change = CONFIGS[config]
        key = json.dumps([change.get("validator"), change.get("validate", {})], sort_keys=True)
        if key in scored:
            _copy_stage_files(scored[key], run_dir, (stage_info("validate").stem,))
        else:
            _stage("validate", config_yaml)
            scored[key] = run_dir
        _stage("pairs", config_yaml)
        pairs_file = run_dir / "05_pairs.jsonl"
        if change.get("shuffle"):
            shuffle_pairs(pairs_file, run_dir / "05_pairs.shuffled.jsonl", seed)
            pairs_file = run_dir / "05_pairs.shuffled.jsonl"
        quality = pair_accuracy(pairs_file, scenes)
        if not _has_train_pairs(pairs_file):
            # Nothing to learn from: the policy stays the strong model (recorded, not hidden).
            out["configs"][config] = {**out["before"], "pair_accuracy": quality, "trained": False}
            timings[config] = round(time.time() - started, 1)
            continue
        outcome = _stage("train", config_yaml)
        after = evaluate_model(
            str(settings.models / "strong"),
            world["test"],
            questions,
            root / "eval" / config,
            str(run_dir / "06_train" / "adapter"),
            eval_settings,
        )
        out["configs"][config] = {
            **_headline(after),
            "pair_accuracy": quality,
            "trained": True,
            "train_final_loss": outcome.summary["final_loss"],
            "train_reward_accuracy": outcome.summary["final_rewards"].get("accuracies"),
        }
        timings[config] = round(time.time() - started, 1)
    return out


def _has_train_pairs(pairs_file: Path) -> bool:
    from capdpo.jsonl import iter_jsonl

    return any(r.get("split", "train") == "train" for r in iter_jsonl(pairs_file))


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    g = metrics["generative"]
    d = metrics.get("discriminative", {})
    return {
        "CHAIR_i": g["CHAIR_i"],
        "CHAIR_s": g["CHAIR_s"],
        "coverage": g["coverage"],
        "sentence_accuracy": g["sentence_accuracy"],
        "object_recall": g["object_recall"],
        "hallucinated_words": g["hallucinated_words"],
        "planted": g.get("planted"),
        "yes_no_accuracy": d.get("accuracy"),
    }


# ---- aggregation --------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def meets_targets(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """CHAIR_i down >= 30% relative with coverage down <= 5 points (one seed)."""
    if before["CHAIR_i"] <= 0:
        return False
    drop = (before["CHAIR_i"] - after["CHAIR_i"]) / before["CHAIR_i"]
    return drop >= TARGET_RELATIVE_CHAIR_I_DROP and before["coverage"] - after["coverage"] <= TARGET_MAX_COVERAGE_DROP


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds per configuration, relative CHAIR_i drop, and whether the targets hold on every seed."""
    columns = ("CHAIR_i", "CHAIR_s", "coverage", "sentence_accuracy", "object_recall", "yes_no_accuracy")
    rows: dict[str, Any] = {"before": {c: _mean_std([s["before"][c] for s in per_seed]) for c in columns}}
    configs = [c for c in CONFIGS if all(c in s["configs"] for s in per_seed)]
    for config in configs:
        runs = [s["configs"][config] for s in per_seed]
        row = {c: _mean_std([r[c] for r in runs]) for c in columns}
        drops = [
            (s["before"]["CHAIR_i"] - s["configs"][config]["CHAIR_i"]) / s["before"]["CHAIR_i"] * 100
            if s["before"]["CHAIR_i"]
            else 0.0
            for s in per_seed
        ]
        row["relative_CHAIR_i_drop"] = _mean_std(drops)
        row["pair_chosen_better"] = _mean_std([r["pair_accuracy"]["chosen_better"] for r in runs])
        row["pairs"] = _mean_std([r["pair_accuracy"]["pairs"] for r in runs])
        row["targets_every_seed"] = all(meets_targets(s["before"], s["configs"][config]) for s in per_seed)
        rows[config] = row
    return rows


def markdown_table(summary: dict[str, Any], seeds: list[int]) -> str:
    """The results table (mean ± std over seeds)."""

    def cell(value: tuple[float, float], digits: int = 1) -> str:
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        f"Seeds: {', '.join(map(str, seeds))}. Percentages; mean ± std over seeds. 'pairs ok' = share of "
        "pairs whose chosen side has fewer wrong claims than the rejected side (ground truth).",
        "",
        "| configuration | CHAIR_i ↓ | CHAIR_s ↓ | coverage | exact sentences | yes/no acc. | CHAIR_i drop (rel.) "
        "| pairs | pairs ok | targets, every seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    before = summary["before"]
    lines.append(
        f"| before (strong model) | {cell(before['CHAIR_i'])} | {cell(before['CHAIR_s'])} | {cell(before['coverage'])} "
        f"| {cell(before['sentence_accuracy'])} | {cell(before['yes_no_accuracy'])} | | | | |"
    )
    for config, row in summary.items():
        if config == "before":
            continue
        lines.append(
            f"| {config} | {cell(row['CHAIR_i'])} | {cell(row['CHAIR_s'])} | {cell(row['coverage'])} "
            f"| {cell(row['sentence_accuracy'])} | {cell(row['yes_no_accuracy'])} | {cell(row['relative_CHAIR_i_drop'])} "
            f"| {cell(row['pairs'], 0)} | {cell(row['pair_chosen_better'])} | {'yes' if row['targets_every_seed'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    """Bar chart of CHAIR_i (mean ± std) before and after each configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["CHAIR_i"][0] for n in names]
    stds = [summary[n]["CHAIR_i"][1] for n in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.2))
    colours = ["#888888"] + ["#d9534f" if "shuffled" in n else "#337ab7" for n in names[1:]]
    ax.bar(names, means, yerr=stds, color=colours, capsize=3)
    ax.set_ylabel("CHAIR_i (%)")
    ax.set_title("Object hallucination on held-out synthetic images (lower is better)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(settings: Settings) -> dict[str, Any]:
    """Every seed, then `results.json`, `results.md` and `chair_i.png` in `settings.out`."""
    from capdpo.errors import InputError
    from capdpo.jsonl import write_json

    for role in ("strong", "weak"):
        if not (settings.models / role / "config.json").is_file():
            raise InputError(
                f"{settings.models / role}: no model; build them with `python -m capdpo build-synthetic --out "
                f"{settings.models}`"
            )
    unknown = [c for c in settings.configs if c not in CONFIGS]
    if unknown:
        from capdpo.errors import ConfigError

        raise ConfigError(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if settings.parallel > 1 and len(settings.seeds) > 1:
        per_seed = _run_seeds_in_processes(settings)
    else:
        per_seed = []
        for seed in settings.seeds:
            per_seed.append(run_seed(settings, seed))
            write_json(settings.out / f"seed{seed}" / "seed_result.json", per_seed[-1])
    summary = summarise(per_seed)
    result = {
        "settings": _settings_dict(settings),
        "seeds": per_seed,
        "summary": summary,
        "seconds": round(time.time() - started, 1),
    }
    write_json(settings.out / "results.json", result)
    (settings.out / "results.md").write_text(markdown_table(summary, settings.seeds))
    chart(summary, settings.out / "chair_i.png")
    return result


def _run_seeds_in_processes(settings: Settings) -> list[dict[str, Any]]:
    """Each seed in its own process (`--only_seed`), at most `settings.parallel` at once; results read back."""
    import os
    import subprocess
    import sys

    pending = list(settings.seeds)
    running: dict[int, subprocess.Popen] = {}
    failed = []
    while pending or running:
        while pending and len(running) < settings.parallel:
            seed = pending.pop(0)
            log = (settings.out / f"seed{seed}.log").open("w")
            cmd = [sys.executable, "-m", "capdpo", "experiment", "--only_seed", str(seed)]
            cmd += ["--out", str(settings.out), "--models", str(settings.models), "--scale", settings.scale_name]
            cmd += ["--device", settings.device, "--configs", *settings.configs]
            cmd += ["--set", *(f"{key}={value}" for key, value in asdict(settings.scale).items())]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // settings.parallel))}
            running[seed] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(2)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                if proc.returncode != 0:
                    failed.append(seed)
    if failed:
        raise RuntimeError(f"seed(s) {failed} failed; see {settings.out}/seed<N>.log")
    return [json.loads((settings.out / f"seed{s}" / "seed_result.json").read_text()) for s in settings.seeds]


def _settings_dict(settings: Settings) -> dict[str, Any]:
    return {
        "out": str(settings.out),
        "models": str(settings.models),
        "seeds": settings.seeds,
        "scale": asdict(settings.scale),
        "configs": settings.configs,
        "device": settings.device,
    }


@dataclass
class ExperimentOptions:
    """`python -m capdpo experiment`: the synthetic world's before/after experiment over seeds and configurations."""

    seeds: int = option("Number of seeds (0..N-1).", 3)
    out: str = option("Output folder.", "runs/synthetic")
    models: str = option("Folder with strong/ and weak/.", "models/synthetic")
    scale: str = option(f"Experiment size: {', '.join(SCALES)}.", "full")
    configs: list[str] = option(
        f"Configurations (default: all of {', '.join(CONFIGS)}).", factory=lambda: list(CONFIGS)
    )
    device: str = option("'auto', 'cpu' or 'cuda'.", "auto")
    parallel: int = option("Seeds run at once, one process each.", 1)
    set: list[str] = option(
        "Change fields of the scale, e.g. --set samples_per_image=8 dpo_epochs=4 (fields: "
        + ", ".join(f.name for f in fields(Scale))
        + ").",
        factory=list,
    )
    only_seed: int | None = option("Run this one seed only (what each process of --parallel runs).", None)

    def __post_init__(self) -> None:
        require_choice("--scale", self.scale, SCALES)
        require_known("--configs", self.configs, CONFIGS)


def main(argv: list[str] | None = None) -> None:
    def _run(args: list[str] | None) -> None:
        opts = parse_options(ExperimentOptions, args, __doc__.split("\n\n")[0])
        settings = Settings(
            out=Path(opts.out),
            models=Path(opts.models),
            seeds=list(range(opts.seeds)) if opts.only_seed is None else [opts.only_seed],
            scale=scale_with(SCALES[opts.scale], opts.set),
            configs=opts.configs,
            device=opts.device,
            parallel=opts.parallel,
            scale_name=opts.scale,
        )
        if opts.only_seed is not None:
            settings.out.mkdir(parents=True, exist_ok=True)
            write_json(settings.out / f"seed{opts.only_seed}" / "seed_result.json", run_seed(settings, opts.only_seed))
            return
        result = run_experiment(settings)
        print(markdown_table(result["summary"], settings.seeds))
        print(f"done in {result['seconds']} s; results in {settings.out}/results.md, results.json, chair_i.png")

    run_cli(_run, argv)
