"""Run configs: one YAML per run, one dataclass per section, command-line flags over the YAML.

A run YAML has shared top-level keys (`CommonConfig`) and one section per stage or tool::

    run_dir: runs/demo
    strong_model: Qwen/Qwen2.5-VL-7B-Instruct
    describe:
      max_new_tokens: 256

Each section's dataclass lives beside the code it configures (`capdpo/<package>/config.py`) and is declared with
`option(...)`, whose help text `--help` shows; `capdpo.sections` lists them all, and `capdpo.cli` reads a YAML
plus flags into them. This module holds what they share: `option`, `CommonConfig`, typed building of a
section from a YAML mapping, and YAML reading with one-line errors.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from capdpo.errors import ConfigError


def option(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A config field with its help text (shown by `--help` and written in the docs)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def require(ok: bool, name: str, rule: str) -> None:
    """Raise `ConfigError('<name>: <rule>')` unless `ok`."""
    if not ok:
        raise ConfigError(f"{name}: {rule}")


def require_at_least(section: str, cfg: Any, minimum: int, names: tuple[str, ...]) -> None:
    """Every field in `names` of `cfg` must be >= `minimum`."""
    for name in names:
        require(getattr(cfg, name) >= minimum, f"{section}.{name}", f"must be >= {minimum}")


def require_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    """`value` must be one of `choices` (named in the error)."""
    choices = tuple(choices)
    require(value in choices, name, f"'{value}' is not one of {', '.join(choices)}")


def require_known(name: str, values: list[str], choices: typing.Iterable[str], what: str = "") -> None:
    """Every item of `values` must be one of `choices`."""
    choices = tuple(choices)
    unknown = [v for v in values if v not in choices]
    require(not unknown, name, f"unknown {what + ' ' if what else ''}{unknown}; choose from {', '.join(choices)}")


@dataclass
class CommonConfig:
    """Keys shared by every stage of a run."""

    run_dir: str = option("Folder that holds every output of this run (created if missing).", "runs/default")
    seed: int = option("Seed for sampling images, generation and the train/validation split.", 0)
    strong_model: str = option(
        "Hub id or local folder of the strong VLM (describes images, writes variants).", "Qwen/Qwen2.5-VL-7B-Instruct"
    )
    strong_adapter: str = option(
        "PEFT adapter folder merged into strong_model wherever it is used (stages 2, 3 and 6): an earlier round's "
        "trained policy (see `python -m capdpo prepare-round`). Record ids and the reference log-probs include its "
        "content hash. Empty: none.",
        "",
    )
    weak_model: str = option(
        "Hub id or local folder of the weak VLM that scores candidates.", "Qwen/Qwen2.5-VL-3B-Instruct"
    )
    device: str = option("'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.", "auto")
    dtype: str = option("'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16' or 'float32'. fp16 is refused.", "auto")
    attn_implementation: str = option("'auto' (flash_attention_2 if installed, else sdpa), 'sdpa' or 'eager'.", "auto")
    min_pixels: int = option("Smallest image area in pixels fed to Qwen models (0: the processor's own setting).", 0)
    max_pixels: int = option("Largest image area in pixels fed to Qwen models (0: the processor's own setting).", 0)
    trust_remote_code: bool = option("Allow model repos to run their own Python code. Off unless you trust it.", False)
    allow_partial: bool = option("Accept an unfinished previous stage as input (its finished records only).", False)
    allow_empty: bool = option("Accept a previous stage that produced no records (a run on nothing).", False)
    max_image_pixels: int = option(
        "Largest image decoded, in pixels (width x height from the file's header, checked before decoding); "
        "larger ones are refused and listed (100 M: well above any photograph).",
        100_000_000,
    )
    max_image_bytes: int = option("Largest image file or dataset cell read, in bytes (100 MiB).", 100 * 2**20)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"dtype: '{self.dtype}' is not one of auto, bfloat16, float32 (fp16 overflows in VLMs)")
        require_choice(
            "attn_implementation",
            self.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"),
        )
        require(
            self.max_image_pixels > 0 and self.max_image_bytes > 0, "max_image_pixels / max_image_bytes", "must be > 0"
        )
        if (self.min_pixels or self.max_pixels) and not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("min_pixels/max_pixels: set both, with 0 < min_pixels <= max_pixels (or both 0)")


COMMON_KEYS = frozenset(f.name for f in fields(CommonConfig))


@dataclass
class LoadedConfig:
    """What a stage or tool gets: the shared keys, its own section, and where they came from."""

    common: CommonConfig
    section: Any
    name: str  # the section's name in the YAML
    path: str | None
    argv: list[str]

    def resolved(self) -> dict[str, Any]:
        """The values in effect, for writing beside the outputs."""
        return {**asdict(self.common), self.name: asdict(self.section), "_config_file": self.path, "_argv": self.argv}


# ---- YAML -----------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML itself would keep the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first on line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run YAML as a mapping, with one-line errors for a missing or malformed file or a repeated key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


# ---- typed building -------------------------------------------------------------------------------------------
def _type_ok(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping: unknown keys and wrong types are one-line
    `ConfigError`s naming `where` and the key (with the closest known key as a hint)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        if not _type_ok(hints[key], value):
            raise ConfigError(f"{where}: '{key}' should be {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**{k: (float(v) if hints[k] is float else v) for k, v in values.items()})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
