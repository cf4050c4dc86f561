"""The performance figures name the files that hold them: every results file the README's Performance section,
docs/PERFORMANCE.md or bench/results/README.md names is committed under bench/results/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
NAME = re.compile(r"`([A-Za-z0-9_.{},*\-]+\.(?:json|txt|log))`")


def _expand(name: str) -> list[str]:
    """`a_{x,y}.json` -> [`a_x.json`, `a_y.json`] (shell brace expansion, nested left to right)."""
    match = re.search(r"\{([^}]*)\}", name)
    if match is None:
        return [name]
    return [
        expanded
        for alternative in match.group(1).split(",")
        for expanded in _expand(name[: match.start()] + alternative + name[match.end() :])
    ]


def _performance_text() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Performance") : readme.index("\n## ", readme.index("## Performance") + 1)]
    return section + (ROOT / "docs" / "PERFORMANCE.md").read_text() + (RESULTS / "README.md").read_text()


def test_expand_braces() -> None:
    assert _expand("t_{a,b}_{1,2}.json") == ["t_a_1.json", "t_a_2.json", "t_b_1.json", "t_b_2.json"]
    assert _expand("plain.log") == ["plain.log"]


def test_every_named_results_file_is_committed() -> None:
    names = set(NAME.findall(_performance_text()))
    assert len(names) > 20, "the Performance section names its files"
    missing = [
        pattern
        for name in sorted(names)
        for pattern in _expand(name)
        if not (list(RESULTS.glob(pattern)) if "*" in pattern else (RESULTS / pattern).is_file())
    ]
    assert not missing, f"named in the performance docs but not under bench/results/: {missing}"
