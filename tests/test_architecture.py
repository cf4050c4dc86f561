"""The package's layout rules (docs/ARCHITECTURE.md), checked on the source: no import cycles, stages are leaves,
the root holds only cross-cutting modules, the numbered scripts only call into their stage, the registries hold
every member the config accepts, and every section has its one registration."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "capdpo"
CROSS_CUTTING = {
    "__init__",
    "__main__",
    "api",
    "cli",
    "config",
    "errors",
    "images",
    "jsonl",
    "paths",
    "pipeline",
    "provenance",
    "records",
    "run",
    "sections",
    "splits",
    "text",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every capdpo module `path` imports, at any depth of the file (lazy imports count), but not under
    `if TYPE_CHECKING:`; importing `a.b.c` also imports the packages `a.b` and `a`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        for name in names:
            if not name.startswith("capdpo"):
                continue
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known}
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {"capdpo"} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_stages_are_leaves_and_never_import_each_other() -> None:
    edges = graph()
    for module, imported in edges.items():
        into_stages = {m for m in imported if m.startswith("capdpo.stages")}
        if module.startswith("capdpo.stages."):
            assert into_stages <= {"capdpo.stages"}, f"{module} imports another stage: {into_stages}"
        elif module != "capdpo.stages":
            assert not into_stages, f"{module} imports {into_stages}; only the numbered scripts run stages"


def test_the_package_root_holds_only_cross_cutting_modules() -> None:
    root_modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert root_modules == CROSS_CUTTING


def test_each_stage_module_is_named_as_its_script_and_the_scripts_only_call_it() -> None:
    from capdpo.pipeline import STAGES

    assert [info.number for info in STAGES] == list(range(1, 7))
    for info in STAGES:
        assert (PACKAGE / "stages" / f"{info.name}.py").is_file()
        script = ROOT / info.script
        tree = ast.parse(script.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [(info.module, ["main"])], script
    stage_files = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert stage_files == {info.name for info in STAGES}


def test_every_config_section_is_registered_once_and_stage_sections_match_the_pipeline() -> None:
    from capdpo.pipeline import STAGES
    from capdpo.sections import SECTIONS

    assert [s for s in SECTIONS][: len(STAGES)] == [info.section for info in STAGES]
    assert len(set(SECTIONS.values())) == len(SECTIONS)
    # every dataclass in a config module is a registered section (or a shared base of one)
    for path in PACKAGE.glob("*/config.py"):
        tree = ast.parse(path.read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        registered = {cls.__name__ for cls in SECTIONS.values()}
        bases = {b.__name__ for cls in SECTIONS.values() for b in cls.__mro__[1:]}
        unregistered = [c for c in classes if c not in registered | bases and not c.startswith("_")]
        assert not unregistered, f"{path}: {unregistered} are not in capdpo.sections.SECTIONS"


def test_registries_and_their_configs_agree() -> None:
    from capdpo.evaluation.benchmarks import BENCHMARKS
    from capdpo.formats.registry import EXPORTERS, FORMATS, IMPORTERS
    from capdpo.generation.backends import BACKENDS
    from capdpo.pairs.modes import MODES
    from capdpo.training.losses import LOSSES
    from capdpo.validation.methods import METHODS

    assert {"yesno", "rating", "pairwise"} <= set(METHODS)
    assert {"context", "sentence"} <= set(MODES)
    assert "local" in BACKENDS
    assert {"sigmoid", "unidpo"} <= set(LOSSES) and not LOSSES["unidpo"].trl
    assert set(EXPORTERS) == {"trl", "llamafactory", "unidpo"} and set(IMPORTERS) == set(FORMATS)
    for name, benchmark in BENCHMARKS.items():
        assert callable(benchmark.load("queries")) and callable(benchmark.load("write")), name
        assert (ROOT / benchmark.scorer).is_file(), name


def test_every_command_resolves_and_an_unknown_one_is_a_one_line_error(capsys) -> None:
    import importlib

    import pytest

    from capdpo.__main__ import COMMANDS, main

    for name, (module, function, _) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), function)), name
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'no-such-command'")
