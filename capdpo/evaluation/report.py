"""Before/after report: a markdown table of every benchmark's headline metrics with deltas, and PNG bar charts.

    python eval/report.py --runs base=runs/demo/eval/base trained=runs/demo/eval/trained --out runs/demo/eval/report

Each `--runs` entry is `NAME=PATH` (or just `PATH`, named after its folder). PATH is an evaluation folder laid out as

    <eval_dir>/amber.json        python eval/amber.py ... --type a --out <eval_dir>/amber.json
    <eval_dir>/amber_g.json      (instead of amber.json: generative and discriminative scored separately)
    <eval_dir>/amber_d.json
    <eval_dir>/mmhal.json        python eval/mmhal.py ... --out <eval_dir>/mmhal.json
    <eval_dir>/llava_bench.json  python eval/llava_bench.py ... --out <eval_dir>/llava_bench.json
    <eval_dir>/chair.json        python eval/chair.py ... --out <eval_dir>/chair.json
    <eval_dir>/pope.json         python eval/pope.py ... --out <eval_dir>/pope.json
    <eval_dir>/objhal.json       python eval/objhal.py ... --out <eval_dir>/objhal.json

or a single metrics file (its benchmark recognised from its keys or name). Missing files simply leave their rows
empty. The first run is the baseline: every other run's cell shows its value, the change against the baseline
and whether that change is an improvement (✓) or a regression (✗) given the row's direction (↑ higher is
better, ↓ lower is better). `--out` gets `report.md`, `report.json` and one PNG chart per benchmark.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import REPORTED, Row
from capdpo.evaluation.config import ReportConfig
from capdpo.jsonl import read_json, write_json
from capdpo.sections import load_config

# Metric files of an evaluation folder, report titles and rows, by benchmark (`capdpo.evaluation.benchmarks`).
RUN_FILES = {name: report.files for name, report in REPORTED.items()}
GROUP_TITLES = {name: report.title for name, report in REPORTED.items()}
ROWS = tuple((name, row) for name, report in REPORTED.items() for row in report.rows)


# ---- reading runs -----------------------------------------------------------------------------------------
def detect_benchmark(path: Path, data: Any) -> str:
    """Which benchmark a metrics file belongs to, from its `benchmark` field, its keys, or its name."""
    if isinstance(data, dict):
        if data.get("benchmark") in RUN_FILES:
            return data["benchmark"]
        if "CHAIR_s" in data or "CHAIR_i" in data:
            return "chair"
        if any(k in data for k in ("Cover", "Hal", "Cog", "F1", "AMBER")):
            return "amber"
    stem = path.stem.lower()
    for name in RUN_FILES:
        if stem.startswith(name.split("_")[0]):
            return name
    raise InputError(f"{path}: cannot tell which benchmark these metrics are for (no known keys, unknown name)")


def load_run(path: str | Path) -> dict[str, dict[str, Any]]:
    """Metrics by benchmark for one run: an evaluation folder's known files, or one metrics file."""
    path = Path(path)
    found: dict[str, dict[str, Any]] = {}
    if path.is_dir():
        for benchmark, names in RUN_FILES.items():
            for name in names:
                if (path / name).is_file():
                    data = read_json(path / name)
                    if not isinstance(data, dict):
                        raise InputError(f"{path / name}: expected a JSON object of metrics")
                    # amber_g / amber_d fill what amber.json (or the other half) lacks
                    found[benchmark] = {**data, **found.get(benchmark, {})}
        amber = found.get("amber")
        if amber and "AMBER" not in amber and _number(amber.get("CHAIR")) and _number(amber.get("F1")):
            amber["AMBER"] = amber_score(amber["CHAIR"], amber["F1"])  # g and d scored separately
        if not found:
            known = ", ".join(n for names in RUN_FILES.values() for n in names)
            raise InputError(f"{path}: no metrics files found (looked for {known})")
    elif path.is_file():
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object of metrics")
        found[detect_benchmark(path, data)] = data
    else:
        raise InputError(f"{path}: no such evaluation folder or metrics file")
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def amber_score(chair: float, f1: float) -> float:
    """AMBER score ½·(1 − CHAIR + F1) from percentages, as a percentage rounded half-up to one decimal."""
    value = (Decimal(100) - Decimal(str(chair)) + Decimal(str(f1))) / 2
    return float(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def parse_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=PATH` (or `PATH`) entries; names must be unique."""
    runs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise ConfigError(f"runs: '{spec}' should be NAME=PATH")
        runs.append((name, Path(path)))
    names = [n for n, _ in runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"runs: name(s) {', '.join(duplicated)} given twice; name runs as NAME=PATH")
    return runs


def metric_value(metrics: dict[str, Any] | None, row: Row) -> float | None:
    """The row's value in a benchmark's metrics (None when absent or not a number)."""
    for path in row.keys:
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if _number(value):
            return float(value)
    return None


# ---- the table --------------------------------------------------------------------------------------------
def build_table(runs: list[tuple[str, dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One entry per row that any run has a value for: label, direction, values, deltas to the first run."""
    table = []
    for group, row in ROWS:
        values = [metric_value(metrics.get(group), row) for _, metrics in runs]
        if all(v is None for v in values):
            continue
        digits = row.digits
        if digits is None:
            digits = 3 if all(abs(v) <= 1 for v in values if v is not None) else 1
        base = values[0]
        deltas = [None if base is None or v is None else v - base for v in values]
        table.append(
            {
                "group": group,
                "metric": row.label,
                "better": "higher" if row.higher_is_better else "lower",
                "digits": digits,
                "values": dict(zip([n for n, _ in runs], values, strict=True)),
                "deltas": dict(zip([n for n, _ in runs], deltas, strict=True)),
            }
        )
    return table


def _cell(value: float | None, delta: float | None, digits: int, higher_is_better: bool, is_base: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if is_base or delta is None:
        return text
    shown = round(delta, digits)
    if shown == 0:
        return f"{text} (±0)"
    better = (shown > 0) == higher_is_better
    return f"{text} ({shown:+.{digits}f} {'✓' if better else '✗'})"


def render_markdown(
    title: str, names: list[str], table: list[dict[str, Any]], notes: list[str], charts: list[str]
) -> str:
    """The report: one table, baseline first, each later run with its change against the baseline."""
    lines = [f"# {title}", ""]
    if len(names) > 1:
        lines += [
            f"Baseline: **{names[0]}**. Other runs show value (change vs {names[0]}); ✓ improvement, ✗ regression; "
            "↑ higher is better, ↓ lower is better.",
            "",
        ]
    lines.append("| Benchmark | Metric | Better | " + " | ".join(names) + " |")
    lines.append("|---|---|:-:|" + "---:|" * len(names))
    for entry in table:
        higher = entry["better"] == "higher"
        cells = [
            _cell(entry["values"][n], entry["deltas"][n], entry["digits"], higher, i == 0) for i, n in enumerate(names)
        ]
        lines.append(
            f"| {GROUP_TITLES[entry['group']]} | {entry['metric']} | {'↑' if higher else '↓'} | "
            + " | ".join(cells)
            + " |"
        )
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    if charts:
        lines += ["", *[f"![{c.removesuffix('.png')}]({c})" for c in charts]]
    return "\n".join(lines) + "\n"


def judge_notes(runs: list[tuple[str, dict[str, dict[str, Any]]]]) -> list[str]:
    """Unparseable judge replies and judge differences between runs: the reader must know the figures' footing."""
    notes = []
    for benchmark in ("mmhal", "llava_bench"):
        judges = set()
        for name, metrics in runs:
            m = metrics.get(benchmark)
            if not m:
                continue
            judge = m.get("judge") or {}
            judges.add(judge.get("model"))
            if m.get("unparseable"):
                notes.append(
                    f"{name}: {m['unparseable']} of {m.get('n', '?')} {GROUP_TITLES[benchmark]} judge replies were "
                    f"unparseable ({m.get('unparseable_policy', 'skip')}; see the reviews file)."
                )
        if len(judges - {None}) > 1:
            notes.append(
                f"{GROUP_TITLES[benchmark]} was judged by different models across runs: {sorted(map(str, judges))}."
            )
    for name, metrics in runs:
        unread = (metrics.get("chair") or {}).get("Critic_unparsed")
        if unread:
            notes.append(f"{name}: {unread} critic score(s) of the CHAIR captions were unreadable.")
    return notes


# ---- charts -----------------------------------------------------------------------------------------------
def render_charts(names: list[str], table: list[dict[str, Any]], out: Path) -> list[str]:
    """One PNG per benchmark: a panel per metric (own scale), a bar per run. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for group in GROUP_TITLES:
        rows = [e for e in table if e["group"] == group]
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(rows), figsize=(2.1 * len(rows) + 1.2, 3.4), squeeze=False)
        for ax, entry in zip(axes[0], rows, strict=True):
            values = [entry["values"][n] for n in names]
            heights = [0.0 if v is None else v for v in values]
            bars = ax.bar(range(len(names)), heights, color=[colours[i % len(colours)] for i in range(len(names))])
            for bar, value in zip(bars, values, strict=True):
                label = "n/a" if value is None else f"{value:.{entry['digits']}f}"
                ax.annotate(
                    label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
                )
            ax.set_title(f"{entry['metric']} {'↑' if entry['better'] == 'higher' else '↓'}", fontsize=9)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            top = max(heights) if any(heights) else 1.0
            ax.set_ylim(0, top * 1.18)
        fig.suptitle(GROUP_TITLES[group], fontsize=11)
        fig.tight_layout()
        name = f"{group}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Read every run's metrics, write report.md, report.json and the charts."""
    sec: ReportConfig = cfg.section
    if not sec.runs:
        raise ConfigError("report: --runs NAME=PATH [NAME=PATH ...] is required")
    if not sec.out:
        raise ConfigError("report: --out DIR is required")
    specs = parse_runs(sec.runs)
    runs = [(name, load_run(path)) for name, path in specs]
    names = [n for n, _ in runs]
    table = build_table(runs)
    if not table:
        raise InputError("report: none of the runs holds a metric this report knows")
    out = Path(sec.out)
    out.mkdir(parents=True, exist_ok=True)
    charts = render_charts(names, table, out)
    notes = judge_notes(runs)
    markdown = render_markdown(sec.title, names, table, notes, charts)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    write_json(out / "report.json", {"runs": {n: str(p) for n, p in specs}, "rows": table, "notes": notes})
    print(markdown)
    print(f"[report] {len(table)} metrics of {len(names)} runs -> {out / 'report.md'} (+ {len(charts)} charts)")
    return {"rows": table, "charts": charts, "notes": notes}


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("report", a, __doc__)), argv)
