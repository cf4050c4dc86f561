"""What scripts/check_*_official.py share: the closing line, the JSON record and the exit code of a comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn


def finish(rows: list[dict[str, Any]], differ: int, summary: str, official: str | Path, out: str | None,
           **extra: Any) -> NoReturn:  # fmt: skip
    """Print how many figures were compared and whether all were equal; with `out`, write the rows with the official
    checkout's commit (when it is a git checkout) and `extra`; exit 0 when all are equal, 1 otherwise."""
    count = len(rows)
    print(f"\n{count} figures {summary}: {'all equal' if count and not differ else f'{differ} different'}")
    if out:
        commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True)
        result = {
            "official_commit": commit.stdout.strip() if commit.returncode == 0 else "unknown (not a git checkout)",
            **extra,
            "figures": rows,
        }
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if count and not differ else 1)
