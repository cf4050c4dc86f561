"""Every section a run YAML may hold, registered in this one place, and `load_config`, which reads a run YAML
plus command-line flags into the shared keys and one section.

A section's dataclass lives beside the code it configures; adding a section means adding its line here. Every
command validates the whole file against this table, so a typo in a later stage's section fails before hours of
generation, and a YAML that also carries other tools' sections (`interop:`, `answers:`, ...) is valid for every
stage.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

from capdpo.cli import parser_for, refuse_remaining
from capdpo.config import COMMON_KEYS, CommonConfig, LoadedConfig, build, read_yaml
from capdpo.errors import ConfigError
from capdpo.evaluation.config import AnswersConfig, LlavaBenchConfig, MMHalConfig, ObjHalConfig, ReportConfig
from capdpo.formats.config import InteropConfig
from capdpo.generation.config import DescribeConfig, VariantsConfig
from capdpo.images import set_limits
from capdpo.pairs.config import PairsConfig
from capdpo.sources.config import ImagesConfig
from capdpo.training.config import DpoConfig, SftConfig
from capdpo.validation.config import ValidateConfig

SECTIONS: dict[str, type] = {
    # the pipeline's stages, in order (capdpo.pipeline.STAGES names the same sections)
    "images": ImagesConfig,
    "describe": DescribeConfig,
    "variants": VariantsConfig,
    "validate": ValidateConfig,
    "pairs": PairsConfig,
    "train": DpoConfig,
    # tools that read the same run YAML
    "sft": SftConfig,
    "interop": InteropConfig,
    "answers": AnswersConfig,
    "mmhal": MMHalConfig,
    "llava_bench": LlavaBenchConfig,
    "objhal": ObjHalConfig,
    "report": ReportConfig,
}


def validate_config_file(path: str | Path) -> dict[str, Any]:
    """Check every key and section of a run YAML; return the built dataclasses by section name."""
    data = read_yaml(path)
    built: dict[str, Any] = {
        "common": build(CommonConfig, {k: v for k, v in data.items() if k in COMMON_KEYS}, str(path))
    }
    for key, value in data.items():
        if key in COMMON_KEYS:
            continue
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), [*COMMON_KEYS, *SECTIONS], n=1)
            hint = f" — did you mean '{close[0]}'?" if close else f" (sections: {', '.join(SECTIONS)})"
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{key}' must be a mapping of keys")
        built[key] = build(SECTIONS[key], value, f"{path}: {key}")
    return built


def load_config(section: str, argv: list[str] | None = None, description: str = "") -> LoadedConfig:
    """`--config FILE` plus flag overrides, into the shared keys and one section.

    The whole file is validated first (every section, `capdpo.sections`). Flags name fields of the shared keys
    or of `section` without a prefix (`--max_new_tokens 128`).

    Args:
        section: the YAML section this command reads (`describe`, `validate`, ...).
        argv: command-line arguments (default: `sys.argv[1:]`).
        description: shown by `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    rest = []
    it = iter(range(len(argv)))
    for i in it:
        if argv[i] == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
            next(it, None)
        elif argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
    cls = SECTIONS[section]
    defaults: dict[str, Any] = {}
    if config:
        validate_config_file(config)
        data = read_yaml(config)
        defaults.update({k: v for k, v in data.items() if k in COMMON_KEYS})
        defaults.update(data.get(section) or {})
    parser = parser_for(
        [CommonConfig, cls],
        (description + "\n\n" if description else "") + "--config FILE: the run YAML; flags override it.",
    )
    parser.set_defaults(**defaults)
    common, sec, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    refuse_remaining(remaining, [CommonConfig, cls], f" for section '{section}'")
    set_limits(common.max_image_pixels, common.max_image_bytes)
    return LoadedConfig(common=common, section=sec, name=section, path=config, argv=argv)
