"""The one command-line parser, shared by the numbered scripts, `python -m capdpo ...` and the `eval/` scripts.

Options are dataclass fields (`capdpo.config.option`); transformers' `HfArgumentParser` turns them into flags.
`parse_options` reads flags only; `capdpo.sections.load_config` puts a run YAML under the same parser (`--config
FILE`; flags override it).
Every mistake (an unknown flag, a wrong value, a missing required option) is a `ConfigError`, which `run_cli`
prints as one line on stderr with exit code 2.
"""

from __future__ import annotations

import difflib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from capdpo.errors import CapdpoError, ConfigError


def parser_for(classes: list[type], description: str) -> Any:
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> typing.NoReturn:  # argparse would print usage and exit; we want one line
            raise ConfigError(f"command line: {message}")

    parser = Parser(classes, allow_abbrev=False)  # a typo must not silently match a longer flag
    parser.description = description
    return parser


def refuse_remaining(remaining: list[str], classes: Sequence[type], what: str) -> None:
    if not remaining:
        return
    flags = [r for r in remaining if r.startswith("--")] or remaining
    known = [f"--{f.name}" for cls in classes for f in fields(cls)]
    close = difflib.get_close_matches(flags[0].replace("-", "_").replace("__", "--", 1), known, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"command line: unknown flag '{flags[0]}'{what}{hint}")


def parse_options(cls: type, argv: list[str] | None, description: str = "", required: Sequence[str] = ()) -> Any:
    """Flags (no YAML) into an instance of the dataclass `cls`; `required` fields must be given a value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for([cls], description)
    options, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    refuse_remaining(remaining, [cls], "")
    missing = [name for name in required if getattr(options, name) in ("", None, [])]
    if missing:
        raise ConfigError(f"command line: --{missing[0]} is required (see --help)")
    return options


# transformers 5 renamed its gradient-checkpointing methods; PEFT and TRL still call the old names (capdpo calls
# neither), so every training or adapter-loading command would print their FutureWarnings
_LIBRARY_DEPRECATIONS = (
    r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated"
)


def quiet_library_deprecations() -> None:
    """Hide the dependencies' deprecation warnings that capdpo's command lines can do nothing about (only for a
    capdpo command's process: a library user's own code keeps seeing them)."""
    import warnings

    warnings.filterwarnings("ignore", message=_LIBRARY_DEPRECATIONS, category=FutureWarning)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a user mistake is printed as one line on stderr and exits with code 2."""
    # Quiet the libraries' own advice (tokenizer fork warnings, hub telemetry); nothing here reaches the network.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    quiet_library_deprecations()
    try:
        main(argv)
    except CapdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
