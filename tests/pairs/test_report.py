"""Stage 5 data report: rendered from a hand-made run directory, then opened and checked in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from capdpo.jsonl import write_json, write_jsonl
from capdpo.pairs.report import CSP, REPORT_FILE, main, write_report
from capdpo.records import Candidate, PairRecord, ScoreRecord

XSS = "<script>document.title='pwned'</script>"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",  # let image decoding and the load event finish before the DOM is dumped
]


def make_run(root: Path, sample_images: list[Path]) -> Path:
    """A run directory with 04/05 records, stats of stages 1-5 and one pair whose image is missing."""
    run = root / "run"
    run.mkdir()
    images = [str(p) for p in sample_images[:3]] + [str(root / "gone.jpg")]
    scores = [
        ScoreRecord(
            id=f"s{i}",
            image_id=f"img{i % 4}",
            image=images[i % 4],
            variants_id=f"v{i}",
            description_id=f"d{i}",
            prompt="Describe the image.",
            index=0,
            context=["A red ball sits on grass."],
            candidates=[
                Candidate("A red ball sits on grass.", True, 0.5 + 0.04 * i),
                Candidate("A blue ball sits on grass.", False, 0.1 + 0.03 * i),
                Candidate("Two cats sleep.", False, 0.2),
            ],
            validator={"model": "tiny"},
        ).to_dict()
        for i in range(8)
    ]
    write_jsonl(run / "04_scores.jsonl", scores)

    pairs = []
    for i in range(7):
        before = "The photo shows a garden. "
        pairs.append(
            PairRecord(
                id=f"p{i}",
                image_id=f"img{i % 4}",
                image=images[i % 4],
                prompt="Describe the image in detail.",
                chosen=before + f"A red ball number {i} sits on the grass.",
                rejected=before + f"A blue ball number {i} floats in the sky.",
                score_chosen=0.9,
                score_rejected=0.8 - 0.1 * i,  # gap grows with i: p6 first
                mode="context",
                split="val" if i == 3 else "train",
                meta={"original": f"A red ball number {i} sits on the grass.", "chosen_is_original": True}
                if i % 2
                else {},
            ).to_dict()
        )
    # Untrusted model output: must be shown as text, never run.
    pairs[6]["chosen"] = f"A ball. {XSS} <img src=x onerror=\"document.title='pwned2'\">"
    pairs[5]["prompt"] = "Describe </title><b>bold</b> & more."
    pairs[4].update(
        mode="sentence", assistant_prefix="The photo shows a garden.", chosen="A red ball.", rejected="A cat."
    )
    write_jsonl(run / "05_pairs.jsonl", pairs)
    (run / "05_pairs.done").write_text("{}\n")

    write_json(run / "01_images.stats.json", {"images": 4, "skipped": 0, "seconds": 1.5})
    write_json(run / "04_scores.stats.json", {"sentences": 8, "candidates": 24, "seconds": 3.0})
    write_json(
        run / "05_pairs.stats.json",
        {
            "mode": "context",
            "sentences": 8,
            "removed": {"small_gap_pairs": 11, "duplicate_pairs": 2, "over_image_cap_pairs": 0},
            "fragment_reasons": {"too_few_words": 5, "list_header": 1},
            "pairs": 7,
            "pairs_by_split": {"train": 6, "val": 1},
            "mean_gap": 0.4,
            "exports": {"trl": ["trl/train.jsonl"]},
        },
    )
    write_json(run / "05_pairs.meta.json", {"config": {"pairs": {"min_gap": 0.1, "mode": "context"}}})
    return run


class DomSummary(HTMLParser):
    """Elements of interest in a (dumped) HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def having(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and cls in a.get("class", "").split()]


def parse(text: str) -> DomSummary:
    summary = DomSummary()
    summary.feed(text)
    return summary


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CAPDPO_SKIP_BROWSER") == "1":
        pytest.skip("CAPDPO_SKIP_BROWSER=1: the browser checks of the data report are skipped deliberately")
    pytest.fail(
        "chromium is not installed; the data report test opens the page in it: `apt-get install -y chromium` "
        "(or set CAPDPO_SKIP_BROWSER=1 to skip the browser checks deliberately)"
    )


def dump_dom(page: Path, profile: Path) -> str:
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory, sample_images) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("report")
    run = make_run(root, sample_images)
    out = write_report(run, max_pairs=5)
    return out, out.read_text(encoding="utf-8")


def test_report_content(report):
    out, text = report
    assert out.name == REPORT_FILE
    page = parse(text)
    rows = page.having("article", "pair")
    assert len(rows) == 5  # capped at --max_pairs
    assert [r["data-pair-id"] for r in rows] == ["p6", "p5", "p4", "p3", "p2"]  # highest gap first
    assert len(page.having("img", "thumb")) == 4 and len(page.having("div", "missing")) == 1  # p3 has no image
    charts = {a["data-chart"] for a in page.having("figure", "chart")}
    assert {"candidate_scores", "pair_scores", "gaps", "removed", "fragment_reasons", "pairs_by_split"} <= charts
    assert all(a["src"].startswith("data:image/png;base64,") for a in page.having("img", "chart"))
    # Filter statistics rendered generically with readable labels, settings from the meta file.
    assert "Small gap pairs</th><td>11" in text and "Too few words</th><td>5" in text and "Min gap" in text
    # The untrusted text is escaped; the report itself carries no script at all.
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in text
    assert "<script" not in text.lower() and "<b>bold</b>" not in text
    # Context mode without meta: the differing words are marked; with meta: the original sentence is shown.
    assert "<del>blue</del>" in text and "<ins>red</ins>" in text
    assert "Sentence being replaced</b> A red ball number 5 sits on the grass." in text


def test_report_in_headless_chromium(report, tmp_path):
    out, text = report
    dom = dump_dom(out, tmp_path / "profile1")
    page = parse(dom)
    assert page.title == "capdpo data report — run"
    assert len(page.having("article", "pair")) == 5
    assert not [t for t, _ in page.elements if t == "script"]
    assert "document.title='pwned'" in dom  # present, as text

    # Escaping alone must hold: the same page without its Content-Security-Policy, plus a probe that records
    # whether every image decoded, once the page has loaded.
    probe = (
        "<script>window.addEventListener('load', () => { document.body.dataset.images = JSON.stringify("
        "[...document.images].map(i => [i.className, i.complete, i.naturalWidth])); });</script>"
    )
    unguarded = text.replace(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">', "")
    assert unguarded != text
    probed = tmp_path / "probed.html"
    probed.write_text(unguarded.replace("</body>", probe + "</body>"), encoding="utf-8")
    page = parse(dump_dom(probed, tmp_path / "profile2"))
    assert page.title == "capdpo data report — run"
    body = next(a for t, a in page.elements if t == "body")
    images = json.loads(body["data-images"])
    assert sorted(c for c, _, _ in images) == ["chart"] * 6 + ["thumb"] * 4
    assert all(complete and width > 0 for _, complete, width in images), images


def test_cli_writes_report_and_refuses_missing_pairs(tmp_path, sample_images, capsys):
    run = make_run(tmp_path, sample_images)
    target = tmp_path / "elsewhere" / "r.html"
    main(["--run_dir", str(run), "--out", str(target), "--max_pairs", "0"])
    assert "Data report written to" in capsys.readouterr().out
    assert len(parse(target.read_text(encoding="utf-8")).having("article", "pair")) == 7  # 0: every pair

    (run / "05_pairs.jsonl").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--run_dir", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "05_pairs.jsonl: not found" in err and not (run / REPORT_FILE).exists()


def test_cli_names_a_malformed_pair(tmp_path, sample_images, capsys):
    run = make_run(tmp_path, sample_images)
    lines = (run / "05_pairs.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["score_rejected"] = "high"
    lines[2] = json.dumps(bad)
    (run / "05_pairs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--run_dir", str(run)])
    assert exit_info.value.code == 2
    assert "05_pairs.jsonl record 3: 'score_rejected'" in capsys.readouterr().err
