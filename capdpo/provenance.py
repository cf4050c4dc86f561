"""Where an output came from: the command, the settings, library versions and the capdpo commit.

Every stage's `.meta.json`, every evaluation file's `meta` block and every adapter capdpo writes carry
`provenance(...)`, so any file can be traced to the command that made it. No secret ever enters it: API keys are
named by their environment variable, never read here.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# libraries whose behaviour shapes the outputs
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "qwen-vl-utils", "pillow")


def library_versions() -> dict[str, str]:
    """Versions of Python, capdpo and the libraries whose behaviour shapes the outputs."""
    from capdpo import __version__

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["capdpo"] = __version__
    return versions


def git_commit() -> str:
    """The capdpo checkout's commit (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    """The local time as provenance records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provenance(config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A provenance block: `extra` keys first (what was made: a stage name, an adapter's inputs), then the command
    line, `config` (the resolved configuration, when there is one), library versions, the git commit and the time."""
    block: dict[str, Any] = {**extra, "command": [sys.executable, *sys.argv]}
    if config is not None:
        block["config"] = config
    return {**block, "versions": library_versions(), "git_commit": git_commit(), "written": now()}
