"""Stage 5 data report: one self-contained HTML file to read the preference pairs before training on them.

    python -m capdpo data-report --run_dir runs/demo [--out runs/demo/05_report.html] [--max_pairs 200]

Shows the run's counts (every `NN_*.stats.json` found), what each stage-5 filter removed, score histograms
(all candidates of `04_scores.jsonl`; chosen and rejected scores and their gaps from `05_pairs.jsonl`) and the
pairs themselves, highest score gap first: the image, the sentence being replaced, chosen and rejected with
their scores and the words that differ marked. Images are embedded as JPEG thumbnails and charts as PNGs, so
the file can be mailed or attached to an issue. The page holds no script, and a Content-Security-Policy forbids
any: model outputs are untrusted text and are only ever shown as text.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options, run_cli
from capdpo.config import option
from capdpo.errors import ConfigError, InputError
from capdpo.images import over_limits
from capdpo.jsonl import iter_jsonl, read_json, write_text
from capdpo.pipeline import stage
from capdpo.records import PairRecord

REPORT_FILE = "05_report.html"
THUMBNAIL_PIXELS = 192  # longest side; small enough that hundreds of pairs stay a few MB
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class StageStats:
    """One stage's `*.stats.json` and whether its completion marker exists."""

    name: str  # file stem, e.g. "05_pairs"
    stats: dict[str, Any]
    finished: bool


@dataclass
class ReportInputs:
    """Everything the report shows, read from a run directory."""

    run_dir: Path
    pairs: list[PairRecord]
    stages: list[StageStats] = field(default_factory=list)
    pair_settings: dict[str, Any] = field(default_factory=dict)  # stage 5's resolved `pairs` config section
    original_scores: list[float] = field(default_factory=list)  # 04_scores candidates that are the original
    rewrite_scores: list[float] = field(default_factory=list)
    scores_found: bool = False
    pairs_finished: bool = True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_report_inputs(run_dir: str | Path) -> ReportInputs:
    """Read pairs, scores, stats and settings of a run directory.

    Raises:
        InputError: the run directory or `05_pairs.jsonl` is missing, or a record is malformed (file and record
            named).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run directory not found")
    pairs_path = run_dir / stage("pairs").output
    if not pairs_path.is_file():
        raise InputError(f"{pairs_path}: not found — run `python {stage('pairs').script} --config ...` first")
    pairs = []
    for number, data in enumerate(iter_jsonl(pairs_path), start=1):
        where = f"{pairs_path} record {number}"
        pair = PairRecord.from_dict(data, where)
        for name in ("score_chosen", "score_rejected"):
            if not _is_number(getattr(pair, name)):
                raise InputError(f"{where}: '{name}' is {getattr(pair, name)!r}, not a finite number")
        for name in ("prompt", "chosen", "rejected", "assistant_prefix"):
            if not isinstance(getattr(pair, name), str):
                raise InputError(f"{where}: '{name}' is not a string")
        if not isinstance(pair.meta, dict):
            raise InputError(f"{where}: 'meta' is not an object")
        pairs.append(pair)
    inputs = ReportInputs(run_dir=run_dir, pairs=pairs)
    inputs.pairs_finished = pairs_path.with_name(pairs_path.name.removesuffix(".jsonl") + ".done").exists()

    for path in sorted(run_dir.glob("[0-9][0-9]_*.stats.json")):
        stem = path.name.removesuffix(".stats.json")
        stats = read_json(path)
        if not isinstance(stats, dict):
            raise InputError(f"{path}: expected a JSON object")
        inputs.stages.append(StageStats(stem, stats, (run_dir / f"{stem}.done").exists()))

    meta_path = run_dir / f"{stage('pairs').stem}.meta.json"
    if meta_path.is_file():
        settings = (read_json(meta_path).get("config") or {}).get("pairs") or {}
        inputs.pair_settings = {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))}

    scores_path = run_dir / stage("validate").output
    if scores_path.is_file():
        inputs.scores_found = True
        # Stage 4 may still be running: its finished records are enough for a histogram.
        for number, record in enumerate(iter_jsonl(scores_path, allow_torn_tail=True), start=1):
            candidates = record.get("candidates")
            if not isinstance(candidates, list):
                raise InputError(f"{scores_path} record {number}: 'candidates' is not a list")
            for candidate in candidates:
                score = candidate.get("score") if isinstance(candidate, dict) else None
                if not _is_number(score):
                    raise InputError(f"{scores_path} record {number}: a candidate's 'score' is not a finite number")
                (inputs.original_scores if candidate.get("is_original") else inputs.rewrite_scores).append(score)
    return inputs


# ---- pieces of the page -----------------------------------------------------------------------------------
def e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def readable(key: str) -> str:
    """`small_gap_pairs` -> `Small gap pairs`."""
    words = key.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def thumbnail_uri(path: str, pixels: int = THUMBNAIL_PIXELS) -> tuple[str, int, int] | None:
    """A base64 JPEG data URI of the image at `path` (and its size), or None when it cannot be read or is over
    the image limits (`capdpo.images.LIMITS`, checked from the header before anything is decoded)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if over_limits(size=os.path.getsize(path)):
            return None
        with Image.open(path) as image:
            if over_limits(width=image.width, height=image.height):
                return None
            if image.format == "JPEG":  # decode at a reduced scale: a thumbnail needs no more
                image.draft("RGB", (pixels, pixels))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((pixels, pixels))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.width, image.height


def _png_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_png(series: dict[str, list[float]], title: str, xlabel: str) -> str:
    """Overlaid histograms of the named series (shared bins), as a PNG data URI."""
    import numpy as np
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    values = [v for vs in series.values() for v in vs]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 26)
    figure = Figure(figsize=(5.2, 3.0), dpi=100)
    axes = figure.subplots()
    for (label, vs), colour in zip(series.items(), ("#2b8a3e", "#c92a2a", "#1c7ed6")):
        axes.hist(vs, bins=bins, alpha=0.55, color=colour, label=f"{label} ({len(vs):,})")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    if len(series) > 1:
        axes.legend(frameon=False)
    return _png_uri(figure)


def bar_png(counts: dict[str, float], title: str) -> str:
    """A horizontal bar chart of named counts, as a PNG data URI."""
    from matplotlib.figure import Figure

    labels = [readable(k) for k in counts]
    figure = Figure(figsize=(5.2, 0.45 * len(counts) + 1.0), dpi=100)
    axes = figure.subplots()
    axes.barh(labels[::-1], list(counts.values())[::-1], color="#495057")
    axes.set_title(title)
    for y, value in enumerate(list(counts.values())[::-1]):
        axes.text(value, y, f" {fmt(value)}", va="center", fontsize=8)
    axes.margins(x=0.15)
    return _png_uri(figure)


def chart(uri: str, caption: str, name: str) -> str:
    return (
        f'<figure class="chart" data-chart="{e(name)}"><img class="chart" src="{uri}" alt="{e(caption)}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
    )


def _words(text: str) -> tuple[str, list[str]]:
    """Leading whitespace, then words each carrying the whitespace after it (so spaces never align alone)."""
    lead = text[: len(text) - len(text.lstrip())]
    return lead, re.findall(r"\S+\s*", text[len(lead) :])


def _wrap(tokens: list[str], tag: str) -> str:
    joined = "".join(tokens)
    body = joined.rstrip()
    return f"<{tag}>{e(body)}</{tag}>{e(joined[len(body) :])}" if body else e(joined)


def marked_diff(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Escaped HTML of chosen (changed words in <ins>), rejected (changed words in <del>) and the differing span.

    The span runs from the first to the last word that differs (common prefix and suffix removed): for a
    context-mode pair it is the replaced sentence, rejected version struck out, chosen version inserted.
    """
    lead_c, words_c = _words(chosen)
    lead_r, words_r = _words(rejected)
    keys_c, keys_r = [w.rstrip() for w in words_c], [w.rstrip() for w in words_r]
    out_c, out_r = [e(lead_c)], [e(lead_r)]
    for op, r0, r1, c0, c1 in difflib.SequenceMatcher(a=keys_r, b=keys_c, autojunk=False).get_opcodes():
        if op == "equal":
            out_r.append(e("".join(words_r[r0:r1])))
            out_c.append(e("".join(words_c[c0:c1])))
        else:
            out_r.append(_wrap(words_r[r0:r1], "del"))
            out_c.append(_wrap(words_c[c0:c1], "ins"))
    shortest = min(len(keys_c), len(keys_r))
    prefix = next((i for i in range(shortest) if keys_c[i] != keys_r[i]), shortest)
    suffix = next((i for i in range(shortest - prefix) if keys_c[-1 - i] != keys_r[-1 - i]), shortest - prefix)
    old = "".join(words_r[prefix : len(words_r) - suffix]).strip()
    new = "".join(words_c[prefix : len(words_c) - suffix]).strip()
    span = " → ".join(
        part for part in (f"<del>{e(old)}</del>" if old else "", f"<ins>{e(new)}</ins>" if new else "") if part
    )
    return "".join(out_c), "".join(out_r), span


def gap_of(pair: PairRecord) -> float:
    return float(pair.score_chosen) - float(pair.score_rejected)


def stage_card(stage: StageStats) -> str:
    rows = "".join(
        f"<tr><th>{e(readable(k))}</th><td>{e(fmt(v))}</td></tr>"
        for k, v in stage.stats.items()
        if _is_number(v) or isinstance(v, bool) or (isinstance(v, str) and len(v) < 40)
    )
    status = "finished" if stage.finished else "not finished"
    return (
        f'<div class="card stage" data-stage="{e(stage.name)}"><h3>{e(readable(stage.name))} '
        f'<span class="status {"ok" if stage.finished else "warn"}">{status}</span></h3>'
        f"<table>{rows or '<tr><td>no counts</td></tr>'}</table></div>"
    )


def filter_section(stage: StageStats | None, settings: dict[str, Any]) -> tuple[str, list[str]]:
    """Tables of every numeric stat of stage 5 (nested objects as their own tables) and a bar chart per object."""
    if stage is None:
        return '<p class="note">No 05_pairs.stats.json in this run directory.</p>', []
    top = {k: v for k, v in stage.stats.items() if _is_number(v)}
    groups = {
        k: {kk: vv for kk, vv in v.items() if _is_number(vv)}
        for k, v in stage.stats.items()
        if isinstance(v, dict) and any(_is_number(vv) for vv in v.values())
    }
    tables = []

    def table(title: str, values: dict[str, Any], cls: str) -> str:
        body = "".join(f"<tr><th>{e(readable(k))}</th><td>{e(fmt(v))}</td></tr>" for k, v in values.items())
        return f'<div class="card {cls}"><h3>{e(title)}</h3><table>{body}</table></div>'

    if settings:
        tables.append(table("Settings", settings, "settings"))
    if top:
        tables.append(table("Counts", top, "filter-stats"))
    charts = []
    for name, values in groups.items():
        tables.append(table(readable(name), values, "filter-stats"))
        if len(values) >= 2:
            charts.append(chart(bar_png(values, readable(name)), f"Stage 5: {readable(name).lower()}", name))
    return '<div class="cards">' + "".join(tables) + "</div>", charts


def pair_article(rank: int, pair: PairRecord, thumbs: dict[str, tuple[str, int, int] | None]) -> str:
    if pair.image not in thumbs:
        thumbs[pair.image] = thumbnail_uri(pair.image)
    thumb = thumbs[pair.image]
    if thumb is None:
        picture = f'<div class="thumb missing">image not found<br><code>{e(pair.image)}</code></div>'
    else:
        uri, width, height = thumb
        picture = (
            f'<img class="thumb" src="{uri}" width="{width}" height="{height}" alt="image {e(pair.image_id)}" '
            f'title="{e(pair.image)}">'
        )
    chosen_html, rejected_html, changes = marked_diff(pair.chosen, pair.rejected)
    meta = pair.meta
    if isinstance(meta.get("original"), str):
        sentence = e(meta["original"])
        label = "Sentence being replaced"
    else:
        sentence, label = changes or "(no word differs)", "What differs"
    origin = {
        True: ' <span class="tag">original</span>',
        False: ' <span class="tag">rewrite</span>',
    }
    prefix = f'<p class="prefix"><b>Answer so far</b> {e(pair.assistant_prefix)}</p>' if pair.assistant_prefix else ""
    return (
        f'<article class="pair" id="pair-{rank}" data-pair-id="{e(pair.id)}" data-gap="{gap_of(pair):.6f}">'
        f'<div class="picture">{picture}</div><div class="body">'
        f'<div class="tags"><span class="rank">#{rank}</span> <span class="tag split">{e(pair.split)}</span> '
        f'<span class="tag mode">{e(pair.mode)}</span> <span class="tag gap">gap {gap_of(pair):.3f}</span> '
        f"<code>{e(pair.id)}</code> <code>image {e(pair.image_id)}</code></div>"
        f'<p class="prompt"><b>Prompt</b> {e(pair.prompt)}</p>{prefix}'
        f'<p class="sentence"><b>{label}</b> {sentence}</p>'
        f'<div class="sides"><div class="side chosen"><h4>Chosen · score {pair.score_chosen:.3f}'
        f"{origin.get(meta.get('chosen_is_original'), '')}</h4><p>{chosen_html}</p></div>"
        f'<div class="side rejected"><h4>Rejected · score {pair.score_rejected:.3f}'
        f"{origin.get(meta.get('rejected_is_original'), '')}</h4><p>{rejected_html}</p></div></div>"
        "</div></article>"
    )


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#212529;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
h3{font-size:14px;margin:0 0 6px}h4{font-size:13px;margin:0 0 4px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #dee2e6;border-radius:6px;padding:8px 10px}
table{border-collapse:collapse}th{text-align:left;font-weight:normal;color:#495057;padding:1px 12px 1px 0}
td{text-align:right;font-variant-numeric:tabular-nums}
.status{font-size:11px;font-weight:normal;padding:1px 6px;border-radius:8px}.ok{background:#d3f9d8}
.warn{background:#ffe3e3}.banner{background:#fff3bf;padding:8px 12px;border-radius:6px}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:12px;color:#495057}
.pair{display:grid;grid-template-columns:200px 1fr;gap:14px;border-top:1px solid #dee2e6;padding:12px 0}
.thumb.missing{width:180px;height:120px;background:#f1f3f5;color:#868e96;font-size:12px;padding:8px;
overflow-wrap:anywhere}
.tags{font-size:12px;color:#495057}.tag{background:#f1f3f5;border-radius:8px;padding:1px 6px}
code{font-size:11px;color:#868e96}.prompt,.prefix,.sentence{margin:4px 0}.prefix{color:#868e96}
.sides{display:grid;grid-template-columns:1fr 1fr;gap:10px}.side{padding:6px 8px;border-radius:6px}
.side p{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.chosen{background:#ebfbee}.rejected{background:#fff5f5}
ins{background:#8ce99a;text-decoration:none}del{background:#ffa8a8}.note{color:#868e96}
"""


def render_report(inputs: ReportInputs, max_pairs: int = 200) -> str:
    """The whole report as one HTML document (every text escaped, images and charts inline)."""
    pairs = sorted(inputs.pairs, key=lambda p: (-gap_of(p), p.id))
    shown = pairs if max_pairs <= 0 else pairs[:max_pairs]
    stage5 = next((s for s in inputs.stages if s.name == "05_pairs"), None)

    charts = []
    if inputs.scores_found:
        charts.append(
            chart(
                histogram_png(
                    {"original sentences": inputs.original_scores, "rewrites": inputs.rewrite_scores},
                    "All candidates (04_scores)",
                    "score",
                ),
                "Scores of every candidate of stage 4",
                "candidate_scores",
            )
        )
    charts.append(
        chart(
            histogram_png(
                {"chosen": [p.score_chosen for p in pairs], "rejected": [p.score_rejected for p in pairs]},
                "Chosen vs rejected (05_pairs)",
                "score",
            ),
            "Scores of the chosen and rejected sides of every pair",
            "pair_scores",
        )
    )
    charts.append(
        chart(
            histogram_png({"gap": [gap_of(p) for p in pairs]}, "Score gap (05_pairs)", "chosen − rejected"),
            "Score gap of every pair",
            "gaps",
        )
    )
    filters, filter_charts = filter_section(stage5, inputs.pair_settings)

    banners = []
    if not inputs.pairs_finished:
        banners.append("Stage 5 has not finished (no 05_pairs.done): the pairs and stats may be from an older run.")
    if not inputs.scores_found:
        banners.append("No 04_scores.jsonl: the histogram of all candidates is left out.")
    thumbs: dict[str, tuple[str, int, int] | None] = {}
    articles = "".join(pair_article(rank, pair, thumbs) for rank, pair in enumerate(shown, start=1))
    title = f"capdpo data report — {inputs.run_dir.name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{e(title)}</h1><p class="note">Run directory <code>{e(inputs.run_dir.resolve())}</code> · '
        f"generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} · {len(pairs):,} pairs</p>"
        + "".join(f'<p class="banner">{e(b)}</p>' for b in banners)
        + '<h2 id="overview">Run overview</h2><div class="cards">'
        + ("".join(stage_card(s) for s in inputs.stages) or '<p class="note">No *.stats.json files.</p>')
        + '</div><h2 id="filters">Stage 5 filters</h2>'
        + filters
        + '<h2 id="scores">Scores</h2><div class="charts">'
        + "".join(charts + filter_charts)
        + f'</div><h2 id="pairs">Pairs</h2><p class="note">Showing {len(shown):,} of {len(pairs):,} pairs, highest '
        "score gap first (<code>--max_pairs</code> changes the cap). In each pair the words of chosen that "
        "differ from rejected are <ins>marked</ins>, and those of rejected <del>marked</del>.</p>"
        + f'<div class="pairs">{articles}</div></body></html>\n'
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, max_pairs: int = 200) -> Path:
    """Render the report of `run_dir` into `out` (default `<run_dir>/05_report.html`), written atomically."""
    if max_pairs < 0:
        raise ConfigError("--max_pairs: must be >= 0 (0 shows every pair)")
    inputs = read_report_inputs(run_dir)
    out = Path(out) if out else Path(run_dir) / REPORT_FILE
    write_text(out, render_report(inputs, max_pairs))
    return out


@dataclass
class ReportOptions:
    """`python -m capdpo data-report`: an HTML page of a run's pairs and the stages' statistics."""

    run_dir: str = option("Run directory holding 05_pairs.jsonl.", "")
    out: str = option(f"Output HTML file (default: <run_dir>/{REPORT_FILE}).", "")
    max_pairs: int = option("Show at most this many pairs, highest gap first (0: all).", 200)


def main(argv: list[str] | None = None) -> None:
    def _run(args: list[str] | None) -> None:
        opts = parse_options(ReportOptions, args, __doc__.split("\n\n")[0], required=("run_dir",))
        started = time.time()
        out = write_report(opts.run_dir, opts.out or None, opts.max_pairs)
        size = out.stat().st_size / 1e6
        print(f"Data report written to {out} ({size:.1f} MB, {time.time() - started:.1f} s).")

    run_cli(_run, argv)
