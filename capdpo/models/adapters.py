"""PEFT LoRA adapters: their identity, and exact algebra on their updates (averaging, composing).

    python -m capdpo average-adapters --adapters runs/a/06_train/adapter runs/b/06_train/adapter \
        [--weights 2 1] [--method delta|naive] --out runs/avg_adapter
    python -m capdpo compose-adapters --first A --second B --out C    # A's update + B's, one adapter

`adapter_identity` is an adapter folder's content hash (record ids and reference caches name adapters by it).

**Averaging** is the "ensemble" recipe of training several LoRA configs.

Every adapter must have been trained on the same base model with the same target modules, ranks and alphas
(the first difference is named, with the two folders). Weights (default: uniform) must be non-negative with a
positive sum; they are normalised to sum to 1.

Two meanings of "the average of LoRA adapters", because a LoRA update is bilinear (ΔW = s·B·A, s = alpha / r,
or alpha / sqrt(r) with rsLoRA):

- `delta` (default, exact): the result's update is the weighted mean of the updates, ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ, so the
  merged averaged model is exactly the weighted mean of the merged models. It is stored as a LoRA of rank
  Σ rᵢ: A = concat(cᵢ·Aᵢ) along the rank axis, B = concat(cᵢ·Bᵢ), cᵢ = sqrt(wᵢ·sᵢ), with alpha = rank so
  its own scale is 1. The adapter grows with the number of inputs (n adapters of rank r give rank n·r), which
  costs nothing once merged (`merge_and_unload`). Modules that are saved whole (`modules_to_save`) are
  averaged as they are, which is exact too.
- `naive`: elementwise weighted means of every tensor (A with A, B with B), rank and alpha unchanged, as some
  merging tools do. It is NOT the mean of the updates: mean(B)·mean(A) adds cross terms Bᵢ·Aⱼ (i ≠ j), and for
  adapters trained from different random A initialisations those terms are noise, so the update can shrink or
  drift. It is only reasonable for adapters that started from the same initialisation and stayed close.

**Composing** (`compose_adapters`, used by iterative rounds): the update of an adapter trained on a base with
another adapter merged in, plus that other adapter's, as one adapter on the plain base: the same stacking with
weights 1 (ΔW = s₁·B₁·A₁ + s₂·B₂·A₂), so merging it equals merging the first, then the second.

The output folder holds `adapter_model.safetensors`, an `adapter_config.json` whose rank, alpha and
rank/alpha patterns give every module the right scale, and `averaging.json` (inputs, weights, method, library
versions, git commit). It loads with `PeftModel.from_pretrained(base, out)` or `load_vlm(..., adapter=out)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.config import option
from capdpo.errors import ConfigError, InputError
from capdpo.jsonl import read_json, write_json
from capdpo.provenance import provenance

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "averaging.json"
COMPOSITION = "composition.json"
METHODS = ("delta", "naive")
# adapter_config.json fields that change which modules an adapter touches or how its update is computed.
# Fields that only matter while training (dropout, initialisation, inference_mode, ...) may differ.
SHAPE_FIELDS = (
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "trainable_token_indices",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "bias",
    "fan_in_fan_out",
)
_PREFIX = "base_model.model."
# LoRA factor pairs as PEFT saves them: (suffix of A, suffix of B). The rank is axis 0 of A and axis 1 of B.
_FACTORS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


# ---- identity ---------------------------------------------------------------------------------------------
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@functools.lru_cache(maxsize=16)
def _adapter_digest(folder: str, stamp: tuple[Any, ...]) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", *ADAPTER_WEIGHT_FILES):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def adapter_identity(folder: str) -> str:
    """A content hash of a PEFT adapter folder (its config and weight file), 16 hex digits.

    The same adapter copied elsewhere keeps its identity; retraining it in place changes it.

    Raises:
        InputError: the folder has no adapter_config.json or no weight file.
    """
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"strong_adapter: {folder} has no adapter_config.json — not a PEFT adapter folder")
    files = [path / n for n in ("adapter_config.json", *ADAPTER_WEIGHT_FILES) if (path / n).is_file()]
    if len(files) < 2:
        raise InputError(f"strong_adapter: {folder} has no {' or '.join(ADAPTER_WEIGHT_FILES)}")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)  # recomputed when a file changes
    return _adapter_digest(str(path.resolve()), stamp)


# ---- reading and checking -------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One adapter folder: its config and tensors (on CPU)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Any]


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

    Raises:
        InputError: the folder, its config or its safetensors file is missing or not a LoRA adapter.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: adapter folder not found")
    config = read_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{path / ADAPTER_CONFIG}: peft_type is {found!r}; only LoRA adapters can be averaged")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (there is an adapter_model.bin: re-save it with safe_serialization=True)"
        raise InputError(f"{weights}: not found{hint if (path / 'adapter_model.bin').exists() else ''}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise InputError(f"{weights}: cannot read ({err})") from None
    if not tensors:
        raise InputError(f"{weights}: holds no tensors")
    return Adapter(path=path, config=config, tensors=tensors)


def _canonical(field: str, value: Any) -> Any:
    """A config value in a form where equal meanings compare equal (lists as sorted, paths resolved)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    if field == "base_model_name_or_path" and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


def check_same_shape(adapters: list[Adapter]) -> None:
    """Refuse adapters that differ in base model, targets, ranks, alphas or tensor shapes.

    Raises:
        InputError: naming the first differing config field or tensor, and the two adapter folders.
    """
    first = adapters[0]
    for other in adapters[1:]:
        where = f"adapters {first.path} and {other.path}"
        for field in SHAPE_FIELDS:
            a = _canonical(field, first.config.get(field))
            b = _canonical(field, other.config.get(field))
            if a != b:
                raise InputError(
                    f"{where} differ in adapter_config.json '{field}' ({json.dumps(first.config.get(field))} vs "
                    f"{json.dumps(other.config.get(field))}); only adapters of the same shape can be averaged"
                )
        for key in sorted(first.tensors.keys() | other.tensors.keys()):
            if key not in other.tensors or key not in first.tensors:
                holder = first.path if key in first.tensors else other.path
                raise InputError(f"{where} differ: only {holder} has tensor '{key}'")
            shape_a, shape_b = tuple(first.tensors[key].shape), tuple(other.tensors[key].shape)
            if shape_a != shape_b:
                raise InputError(f"{where} differ in the shape of '{key}' ({list(shape_a)} vs {list(shape_b)})")


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    """Weights that sum to 1 (uniform when None).

    Raises:
        ConfigError: wrong count, a negative or non-finite weight, or a sum that is not positive.
    """
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"--weights: {len(weights)} weight(s) given for {n} adapters; give one per adapter")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"--weights: {weights} — every weight must be a finite number >= 0 (this is a mean)")
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"--weights: {weights} sum to {total}; the sum must be > 0")
    return [w / total for w in weights]


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module` (a model module path) under `config`'s rank/alpha patterns."""
    from peft.utils.other import get_pattern_key  # PEFT's own matching, so the result is what it will load

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return int(rank), float(alpha)


def module_scale(config: dict[str, Any], module: str) -> float:
    """PEFT's scaling of `module`'s LoRA update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank, alpha = module_rank_alpha(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _factor_pairs(adapter: Adapter, plain_only: bool = False) -> dict[str, tuple[str, str]]:
    """Module path -> (key of A, key of B) for every LoRA factor pair in a saved adapter.

    With `plain_only`, a tensor that is not a plain LoRA factor (a whole module, an embedding or bias part) is an
    `InputError`: such parts cannot be composed exactly.
    """
    pairs = {}
    for key in adapter.tensors:
        for suffix_a, suffix_b in _FACTORS:
            if key.endswith(suffix_a):
                stem = key[: -len(suffix_a)]
                key_b = stem + suffix_b
                if key_b not in adapter.tensors:
                    raise InputError(f"{adapter.path}: tensor '{key}' has no matching '{key_b}'")
                pairs[stem.removeprefix(_PREFIX)] = (key, key_b)
    if plain_only:
        plain = {".lora_A.weight", ".lora_B.weight"}
        for key in adapter.tensors:
            if not any(key.endswith(suffix) for suffix in plain):
                raise InputError(
                    f"{adapter.path}: tensor '{key}' is not a LoRA factor (modules_to_save, embeddings, DoRA or "
                    "bias parts cannot be composed exactly); train the rounds with plain LoRA"
                )
        if not pairs:
            raise InputError(f"{adapter.path}: holds no LoRA factors")
    return pairs


def _refuse_inexact(adapter: Adapter, what: str, hint: str) -> None:
    if adapter.config.get("use_dora"):
        raise InputError(
            f"{adapter.path}: DoRA adapters (use_dora) rescale the merged weight by a learned magnitude, so their "
            f"updates do not add up and cannot be {what} exactly{hint}"
        )
    if adapter.config.get("lora_bias"):
        raise InputError(f"{adapter.path}: adapters with lora_bias cannot be {what} exactly{hint}")


def stack_updates(
    adapters: list[Adapter], weights: list[float], pairs: dict[str, tuple[str, str]]
) -> tuple[dict[str, Any], dict[str, int]]:
    """One LoRA whose update is Σ wᵢ·ΔWᵢ: factors stacked along the rank axis, each scaled by √(wᵢ·sᵢ), so its
    own scale must be 1 (alpha = rank). Returns the stacked factor tensors and each module's rank."""
    import torch

    tensors: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for module, (key_a, key_b) in pairs.items():
        parts_a, parts_b = [], []
        for adapter, weight in zip(adapters, weights):
            # Split √(w·s) evenly between the factors so A and B keep comparable magnitudes.
            factor = math.sqrt(weight * module_scale(adapter.config, module))
            parts_a.append(adapter.tensors[key_a].to(torch.float64) * factor)
            parts_b.append(adapter.tensors[key_b].to(torch.float64) * factor)
        dtype = adapters[-1].tensors[key_a].dtype
        tensors[key_a] = torch.cat(parts_a, dim=0).to(dtype).contiguous()
        tensors[key_b] = torch.cat(parts_b, dim=1).to(dtype).contiguous()
        ranks[module] = int(tensors[key_a].shape[0])
    return tensors, ranks


def _unit_scale_config(base: dict[str, Any], rank: int, pattern: dict[str, int], ranks: dict[str, int]) -> dict:
    """`base` with rank `rank` (per-module exceptions in `pattern`) and alpha = rank everywhere, checked against
    the stacked modules' `ranks` the way PEFT will resolve it."""
    config = {**base, "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}
    config["use_rslora"] = False
    for module, r in ranks.items():
        if module_rank_alpha(config, module) != (r, float(r)):  # a pattern PEFT would resolve differently
            raise RuntimeError(f"stacked adapter config gives {module} rank/alpha {module_rank_alpha(config, module)}")
    return config


def average_delta(adapters: list[Adapter], weights: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exact weighted mean of the adapters' updates, as one LoRA of the summed rank (see the module doc).

    Returns:
        (tensors, adapter config) of the averaged adapter.
    """
    _refuse_inexact(adapters[0], "averaged", "; use --method naive")
    pairs = _factor_pairs(adapters[0])
    out, ranks = stack_updates(adapters, weights, pairs)
    n, base = len(adapters), adapters[0].config
    pattern = {k: n * int(v) for k, v in (base.get("rank_pattern") or {}).items()}
    config = _unit_scale_config(base, n * int(base["r"]), pattern, ranks)
    factor_keys = {k for pair in pairs.values() for k in pair}
    for key in adapters[0].tensors:
        if key in factor_keys:
            continue
        if "lora_" in key:
            raise InputError(
                f"{adapters[0].path}: tensor '{key}' is a LoRA part this averaging does not know how to combine "
                "exactly; use --method naive"
            )
        # Whole modules (modules_to_save) and trainable-token deltas enter the model linearly: average as is.
        out[key] = _weighted_sum(adapters, weights, key)
    return out, config


def average_naive(adapters: list[Adapter], weights: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Elementwise weighted mean of every tensor; config unchanged (NOT the mean of the updates, see module doc)."""
    out = {key: _weighted_sum(adapters, weights, key) for key in adapters[0].tensors}
    return out, dict(adapters[0].config)


def _weighted_sum(adapters: list[Adapter], weights: list[float], key: str) -> Any:
    import torch

    total = sum(a.tensors[key].to(torch.float64) * w for a, w in zip(adapters, weights))
    return total.to(adapters[0].tensors[key].dtype).contiguous()


def _save_adapter(
    out: Path, tensors: dict[str, Any], config: dict[str, Any], note: tuple[str, dict[str, Any]], extras: Path | None
) -> Path:
    """Write an adapter folder whole beside `out`, then move it into place (replacing `out`).

    `note` is (file name, contents) of the record of how it was made; `extras`: a folder whose other files
    (processor, tokenizer) are copied beside the adapter, so it is a drop-in for that one.
    """
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skip = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", COMPOSITION, PROVENANCE}
    for extra in extras.iterdir() if extras is not None else []:
        if extra.is_file() and extra.name not in skip:
            shutil.copy2(extra, tmp / extra.name)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(tmp / ADAPTER_CONFIG, config)
    write_json(tmp / note[0], note[1])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def average_adapters(
    paths: list[str | Path],
    out: str | Path,
    weights: list[float] | None = None,
    method: str = "delta",
    overwrite: bool = False,
) -> Path:
    """Average LoRA adapters into a new adapter folder.

    Args:
        paths: two or more adapter folders of the same shape.
        out: output folder (written whole, then moved into place).
        weights: one non-negative weight per adapter (normalised to sum to 1); None for uniform.
        method: `delta` (exact mean of the updates) or `naive` (elementwise mean of the factors).
        overwrite: replace an existing `out`.

    Returns:
        The output folder.

    Raises:
        ConfigError: bad arguments (method, weights, output folder).
        InputError: unreadable or mismatched adapters.
    """
    if method not in METHODS:
        raise ConfigError(f"--method: '{method}' is not one of {', '.join(METHODS)}")
    if len(paths) < 2:
        raise ConfigError(f"--adapters: {len(paths)} adapter given; averaging needs at least two")
    norm = normalise_weights(weights, len(paths))
    out = Path(out)
    resolved_inputs = {Path(p).resolve() for p in paths}
    if out.resolve() in resolved_inputs:
        raise ConfigError(f"--out: {out} is one of the input adapters; choose a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {out} exists and is not empty; choose a new folder or pass --overwrite")

    adapters = [load_adapter(p) for p in paths]
    check_same_shape(adapters)
    tensors, config = (average_delta if method == "delta" else average_naive)(adapters, norm)
    note = {
        "method": method,
        "adapters": [str(Path(p).resolve()) for p in paths],
        "weights": weights if weights is not None else [1.0] * len(paths),
        "normalised_weights": norm,
        "rank_in": adapters[0].config.get("r"),
        "rank_out": config.get("r"),
    }
    return _save_adapter(out, tensors, config, (PROVENANCE, provenance(**note)), extras=None)


def compose_adapters(first: str | Path, second: str | Path, out: str | Path) -> Path:
    """One LoRA adapter whose update is `first`'s plus `second`'s (second trained on the base with first merged).

    ΔW = s₁·B₁·A₁ + s₂·B₂·A₂, stacked as for `average_delta` with weights 1, so merging the result into the base
    equals merging `first`, then `second`. Both must target the same modules of the same base model. The folder
    is written whole, then moved into place (replacing `out`).

    Raises:
        InputError: an adapter is unreadable, not plain LoRA, or targets other modules or another base model.
    """
    a, b = load_adapter(first), load_adapter(second)
    where = f"adapters {a.path} and {b.path}"
    for adapter in (a, b):
        _refuse_inexact(adapter, "composed", "")
    bases = [c.get("base_model_name_or_path") for c in (a.config, b.config)]
    if len({_canonical("base_model_name_or_path", p) for p in bases}) != 1:
        raise InputError(f"{where} were trained on different base models ({bases[0]!r} vs {bases[1]!r})")
    modules_a, modules_b = _factor_pairs(a, plain_only=True), _factor_pairs(b, plain_only=True)
    if modules_a.keys() != modules_b.keys():
        only = sorted(modules_a.keys() ^ modules_b.keys())[0]
        raise InputError(
            f"{where} put LoRA on different modules (e.g. {only}); keep train.lora_targets and lora_vision the "
            "same in every round"
        )
    tensors, ranks = stack_updates([a, b], [1.0, 1.0], modules_a)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = _unit_scale_config(b.config, rank, {m: r for m, r in ranks.items() if r != rank}, ranks)
    note = {
        "adapters": [
            {"path": str(p.path.resolve()), "identity": adapter_identity(str(p.path)), "r": p.config.get("r")}
            for p in (a, b)
        ],
        "rank": config["r"],
        "rank_pattern": config["rank_pattern"],
    }
    return _save_adapter(Path(out), tensors, config, (COMPOSITION, provenance(**note)), extras=b.path)


# ---- command line -------------------------------------------------------------------------------------------
@dataclass
class AverageOptions:
    """`python -m capdpo average-adapters`: the weighted mean of LoRA adapters of the same shape."""

    adapters: list[str] = option("Adapter folders (two or more, same shape).", factory=list)
    weights: list[float] | None = option("One weight per adapter (default: uniform).", None)
    method: str = option(
        "delta: exact mean of the updates (default); naive: elementwise mean of the factors.", "delta"
    )
    out: str = option("Output adapter folder.", "")
    overwrite: bool = option("Replace an existing output folder.", False)


@dataclass
class ComposeOptions:
    """`python -m capdpo compose-adapters`: one adapter with the update of two (the second trained on the first)."""

    first: str = option("The adapter merged in while the second was trained.", "")
    second: str = option("The adapter trained on top of the first.", "")
    out: str = option("Output adapter folder.", "")


def average_main(argv: list[str] | None = None) -> None:
    from capdpo.cli import parse_options, run_cli

    def _run(args: list[str] | None) -> None:
        opts = parse_options(AverageOptions, args, __doc__, required=("adapters", "out"))
        out = average_adapters(opts.adapters, opts.out, opts.weights, opts.method, opts.overwrite)
        config = read_json(out / ADAPTER_CONFIG)
        print(
            f"Averaged {len(opts.adapters)} adapters ({opts.method}, weights "
            f"{[round(w, 4) for w in read_json(out / PROVENANCE)['normalised_weights']]}) into {out} "
            f"(rank {config['r']}, alpha {config['lora_alpha']})."
        )

    run_cli(_run, argv)


def compose_main(argv: list[str] | None = None) -> None:
    from capdpo.cli import parse_options, run_cli

    def _run(args: list[str] | None) -> None:
        opts = parse_options(ComposeOptions, args, __doc__, required=("first", "second", "out"))
        out = compose_adapters(opts.first, opts.second, opts.out)
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        print(f"Composed {opts.first} + {opts.second} into {out} (rank {config['r']}).")

    run_cli(_run, argv)
