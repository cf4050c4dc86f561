"""Train the synthetic world's strong describer and weak verifier from scratch (full fine-tuning with capdpo's SFT).

    python -m capdpo build-synthetic --out models/synthetic --scale full   # GPU recipe (more data and steps)
    python -m capdpo build-synthetic --out models/synthetic --scale cpu    # CPU recipe (strong alone: 54 min, 2 cores)
    python -m capdpo build-synthetic --out /tmp/syn --scale smoke          # seconds, for tests
    python -m capdpo build-synthetic --roles weak ...                      # one role (roles may run in parallel)

1. Draws the `train` split of a world (its own seed; the experiment's images never overlap it: their hashes are
   listed in `<out>/<role>/training_images.txt`, which the experiment gives stage 1 as an exclusion list).
2. Builds untrained Qwen2.5-VL-architecture models with a tokenizer for the synthetic language
   (`capdpo.synthetic.models`).
3. Writes the SFT data (`capdpo.synthetic.tasks`): the **strong** model gets descriptions and rewrites from
   captions biased by `DEFAULT_BIAS` (in images with a circle and no triangle, other shapes are called
   "triangle" with probability 0.6) and yes/no judgements consistent with those captions; the **weak** model
   gets object lists, yes/no questions (stage 4's sentence prompt and object questions), 0-100 ratings and
   A/B choices, all from the ground truth, and never the describe prompt.
4. Trains each with `capdpo.training.sft.run_sft` in phases (method full, vision tower trained, fp32; the weak
   model first on object lists alone, so its vision tower learns to see before the one-bit answers), then
   copies the last phase's model to `<out>/<role>` with `recipe.json` (every setting, each phase's SFT summary
   and a check on held-out images). With `--keep_work`, a rerun into the same `--out` skips finished phases.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options, run_cli
from capdpo.config import option, require_choice, require_known
from capdpo.synthetic.models import STRONG_SIZE, WEAK_SIZE, ModelSize, build_untrained
from capdpo.synthetic.tasks import strong_examples, weak_examples
from capdpo.synthetic.world import DEFAULT_BIAS, BiasRule, WorldImage, generate_world

BUILD_SEED = 1234  # the world seed of the models' training images (experiments use other seeds)
ROLES = ("strong", "weak")


@dataclass
class Phase:
    """One SFT run of a role's training, starting from the previous phase's model (the first: untrained)."""

    name: str  # the work folder is <role>_<name>; the last phase's model is the one shipped
    steps: int
    tasks: tuple[str, ...] = ()  # train only on records of these tasks (empty: all of the role's records)


@dataclass
class RoleRecipe:
    """How one model is trained."""

    size: ModelSize
    passes: int  # passes over the training images, each with freshly sampled captions / questions
    batch_size: int
    learning_rate: float  # peak of each phase's warmup + cosine schedule
    phases: tuple[Phase, ...]
    warmup_ratio: float = 0.05

    @property
    def max_steps(self) -> int:
        return sum(p.steps for p in self.phases)


# The weak model first learns object lists alone (dense, image-dependent answers teach its vision tower to see;
# the one-bit yes/no answers alone leave it at chance for thousands of steps), then the whole mix, then a second
# cosine cycle over it, then the judging tasks alone (no lists: held-out sentence yes/no rose from 72.5% to 81.5%).
# A finished phase is never re-run (see `train_role`).
WEAK_PHASES = (
    Phase("first", 1000, ("list",)),
    Phase("sft", 5000),
    Phase("more", 6000),
    Phase("judge", 4000, ("yesno", "question", "rating", "pairwise")),
)


# The strong model: three cosine cycles over the same data. After the first alone (3,000 steps of 32: less than one
# pass over its 144k records) most of its errors were shape confusions (held-out CHAIR_i 16.6%, the planted
# "triangle" a third of them); after the second, CHAIR_i 8.6% with "triangle" two thirds of them, but on 1000 test
# images stars and triangles were still confused without any circle; after the third, 26 of its 27 hallucinated
# mentions are the planted "triangle". Its hallucinations are then the bias it was trained into, as in the
# co-occurrence hallucinations of real captioners, and one DPO round removes most of them (docs/synthetic).
STRONG_PHASES = (Phase("sft", 3000), Phase("more", 3000), Phase("third", 3000))


@dataclass
class Recipe:
    """A full build: the world and both models."""

    train_images: int
    check_images: int
    strong: RoleRecipe
    weak: RoleRecipe
    dataloader_workers: int = 0


SCALES = {
    "full": Recipe(
        train_images=6000,
        check_images=200,
        strong=RoleRecipe(STRONG_SIZE, passes=14, batch_size=64, learning_rate=1.5e-3, phases=(Phase("sft", 3000),)),
        weak=RoleRecipe(WEAK_SIZE, passes=2, batch_size=128, learning_rate=1.5e-3, phases=WEAK_PHASES),
        dataloader_workers=8,
    ),
    "cpu": Recipe(
        train_images=4000,
        check_images=100,
        strong=RoleRecipe(STRONG_SIZE, passes=12, batch_size=32, learning_rate=1e-3, phases=STRONG_PHASES),
        weak=RoleRecipe(WEAK_SIZE, passes=2, batch_size=32, learning_rate=1e-3, phases=WEAK_PHASES),
    ),
    "smoke": Recipe(
        train_images=24,
        check_images=8,
        strong=RoleRecipe(
            ModelSize(32, 1, 2, 32, 1), passes=1, batch_size=8, learning_rate=1e-3, phases=(Phase("sft", 2),)
        ),
        weak=RoleRecipe(
            ModelSize(32, 1, 2, 32, 1),
            passes=1,
            batch_size=8,
            learning_rate=1e-3,
            phases=(Phase("first", 1, ("list",)), Phase("sft", 2)),
        ),
    ),
}


def training_records(
    role: str, items: list[WorldImage], passes: int, seed: int, rules: tuple[BiasRule, ...]
) -> list[dict[str, Any]]:
    """The SFT records of one role: `passes` shuffled passes over the images with fresh samples each time."""
    rng = random.Random(f"capdpo-synthetic-{role}:{seed}")
    make = strong_examples if role == "strong" else weak_examples
    records = []
    for p in range(passes):
        order = list(items)
        rng.shuffle(order)
        for item in order:
            for record in make(item, rng, rules):
                records.append({**record, "id": f"{role}-{p}-{len(records)}"})
    return records


def train_role(
    role: str, work: Path, records: list[dict[str, Any]], recipe: RoleRecipe, workers: int, device: str
) -> dict[str, Any]:
    """Build an untrained model and fully fine-tune it on `records`, phase by phase; returns the last phase's SFT
    summary with every phase's under "phases".

    A phase that finished earlier with the same data and settings is reused without running (see `_sft_phase`),
    so an extended build (`--keep_work`, same `--out`) trains only its new phases; an interrupted phase resumes
    from its last checkpoint.
    """
    model = str(build_untrained(work / f"{role}_init", recipe.size, seed=BUILD_SEED))
    summaries = []
    for phase in recipe.phases:
        subset = [r for r in records if r["task"] in phase.tasks] if phase.tasks else records
        summary = _sft_phase(f"{role}_{phase.name}", work, subset, model, recipe, phase.steps, workers, device)
        summaries.append({"phase": phase.name, "tasks": list(phase.tasks) or "all", **summary})
        model = summary["saved"]
    return {**summaries[-1], "phases": summaries}


def _sft_phase(
    name: str,
    work: Path,
    records: list[dict[str, Any]],
    model: str,
    recipe: RoleRecipe,
    steps: int,
    workers: int,
    device: str,
) -> dict[str, Any]:
    import yaml

    from capdpo.jsonl import write_jsonl
    from capdpo.sections import load_config
    from capdpo.training.sft import run_sft

    data = work / f"{name}.jsonl"
    fresh = work / f"{name}.jsonl.new"
    write_jsonl(fresh, records)
    same_data = data.exists() and data.read_bytes() == fresh.read_bytes()
    fresh.replace(data)
    config = {
        "run_dir": str(work),
        "seed": BUILD_SEED,
        "device": device,
        "dtype": "float32",  # from-scratch training of tiny models: full precision, same numbers on CPU and GPU
        "strong_model": model,
        "sft": {
            "data_file": str(data),
            "output_dir": str(work / name),
            "method": "full",
            "freeze_vision": False,
            "learning_rate": recipe.learning_rate,
            "lr_scheduler": "cosine",
            "warmup_ratio": recipe.warmup_ratio,
            "weight_decay": 0.01,
            "batch_size": recipe.batch_size,
            "gradient_accumulation_steps": 1,
            "epochs": 1.0,
            "max_steps": steps,
            "max_length": 512,
            "gradient_checkpointing": False,
            "logging_steps": max(1, min(50, steps // 20)),
            "save_steps": max(steps // 4, 1),
            "save_total_limit": 1,
            "cache_images": True,
            "dataloader_workers": workers,
        },
    }
    path = work / f"{name}.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    summary = work / name / "summary.json"
    finished = (work / f"{name}.done").exists() and summary.exists() and (work / name / "model").is_dir()
    if finished and same_data and path.exists() and path.read_text() == text:
        print(f"[build] {name}: finished earlier with the same data and settings; reusing {work / name / 'model'}")
        return json.loads(summary.read_text())
    path.write_text(text)
    return run_sft(load_config("sft", ["--config", str(path)])).summary


def build(
    out: str | Path,
    scale: str = "full",
    device: str = "auto",
    keep_work: bool = False,
    roles: tuple[str, ...] = ROLES,
) -> dict[str, Any]:
    """Run the recipe for `roles` into `out` (see the module docstring); returns the build report.

    Roles are independent (same world, own data and model), so `--roles strong` and `--roles weak` may run at once
    in two processes; each writes `<out>/build_report_<role>.json`.
    """
    from capdpo.jsonl import write_json
    from capdpo.synthetic.evaluate import EvalSettings, evaluate_model, test_questions

    recipe = SCALES[scale]
    out = Path(out)
    work = out / f".work_{'_'.join(roles)}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    world = generate_world(
        work / "world", {"train": recipe.train_images, "test": recipe.check_images}, seed=BUILD_SEED
    )
    questions = test_questions(world["test"])
    report: dict[str, Any] = {"scale": scale, "recipe": asdict(recipe), "bias": [asdict(r) for r in DEFAULT_BIAS]}
    for role in roles:
        role_recipe = getattr(recipe, role)
        records = training_records(role, world["train"], role_recipe.passes, BUILD_SEED, DEFAULT_BIAS)
        summary = train_role(role, work, records, role_recipe, recipe.dataloader_workers, device)
        target = out / role
        shutil.rmtree(target, ignore_errors=True)
        last = work / f"{role}_{role_recipe.phases[-1].name}" / "model"
        shutil.copytree(last, target, ignore=shutil.ignore_patterns("training_args.bin"))
        (target / "training_images.txt").write_text("".join(f"{i.id}\n" for i in world["train"]))
        check = evaluate_model(
            str(target), world["test"], questions, work / f"check_{role}", None, EvalSettings(device=device)
        )
        role_report = {
            "role": role,
            "scale": scale,
            "size": asdict(role_recipe.size),
            "recipe": asdict(role_recipe),
            "records": len(records),
            "bias": [asdict(r) for r in DEFAULT_BIAS],
            "world_seed": BUILD_SEED,
            "sft": summary,
            "check": {k: check.get(k) for k in ("images", "generative", "discriminative")},
        }
        write_json(target / "recipe.json", role_report)
        (target / "README.md").write_text(
            f"The synthetic world's {role} model, trained from scratch by `python -m capdpo build-synthetic "
            f"--scale {scale}` (settings and a check on held-out images in recipe.json). It knows only the "
            "synthetic world of coloured shapes.\n"
        )
        report[role] = role_report
    report["seconds"] = round(time.time() - started, 1)
    write_json(out / f"build_report_{'_'.join(roles)}.json", report)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


@dataclass
class BuildOptions:
    """`python -m capdpo build-synthetic`: train the synthetic world's tiny models."""

    out: str = option("Folder for strong/ and weak/.", "models/synthetic")
    scale: str = option(f"Recipe size: {', '.join(SCALES)}.", "full")
    roles: list[str] = option(f"Models to build: {', '.join(ROLES)} (default: both).", factory=lambda: list(ROLES))
    device: str = option("'auto', 'cpu' or 'cuda'.", "auto")
    keep_work: bool = option("Keep <out>/.work_* (SFT data, checkpoints, logs).", False)

    def __post_init__(self) -> None:
        require_choice("--scale", self.scale, SCALES)
        require_known("--roles", self.roles, ROLES)


def main(argv: list[str] | None = None) -> None:
    def _run(args: list[str] | None) -> None:
        opts = parse_options(BuildOptions, args, __doc__.split("\n\n")[0])
        report = build(opts.out, opts.scale, opts.device, opts.keep_work, tuple(opts.roles))
        for role in opts.roles:
            check = report[role]["check"]
            print(f"{role}: {json.dumps({k: check.get(k) for k in ('generative', 'discriminative')})}")
        print(f"done in {report['seconds']} s: {', '.join(f'{opts.out}/{r}' for r in opts.roles)}")

    run_cli(_run, argv)
