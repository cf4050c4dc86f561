"""Check capdpo's AMBER scorer against the official AMBER `inference.py` on the same responses.

    NLTK_DATA=../shared/data/nltk_data python scripts/check_amber_official.py --official PATH/TO/AMBER

`--official` is a checkout of the AMBER repository (its `inference.py` and `data/`), which capdpo does not ship. The
script writes one seeded response for every query of `data/annotations.json` (descriptions built from each image's
truth and hallucination words, other object words, plurals and capitals; yes/no answers in several forms), scores
the file with the official script and with `eval/amber.py`, and compares every figure the official script prints.
Exit code 0 when all are equal, 1 otherwise.

The official script loads spaCy's `en_core_web_lg` for its word-similarity step. `--similarity stub` (the default)
gives both scorers one stand-in spaCy instead, whose similarity of two words is a fixed function of the pair
(1 for equal words, else a hash in [0, 1), so some pairs pass the 0.8 threshold): the comparison then covers
everything but spaCy's vectors. `--similarity spacy` uses the installed spaCy and its model for both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from official_compare import finish  # noqa: E402

_STUB_SPACY = """
import hashlib


class _Token:
    def __init__(self, text):
        self.text = text

    def similarity(self, other):
        if self.text == other.text:
            return 1.0
        pair = "|".join(sorted((self.text, other.text))).encode()
        return int(hashlib.sha256(pair).hexdigest()[:8], 16) / 16**8


def load(name, *args, **kwargs):
    return _Token
"""

# the official script's section titles (as printed, typos included) -> where capdpo's JSON holds the same figures
_SECTIONS = {
    "Generative Task:": (),
    "Descriminative Task:": (),
    "Exsitence:": ("existence",),
    "Attribute:": ("attribute",),
    "State:": ("attribute", "state"),
    "Number:": ("attribute", "number"),
    "Action:": ("attribute", "action"),
    "Relation:": ("relation",),
}
_ANSWERS = [
    "Yes",
    "No",
    "yes",
    "no",
    "Yes.",
    "No.",
    "Yes, there is.",
    "No, there is not.",
    "There is one.",
    "Not sure",
]


def responses(annotations: list[dict], association: dict[str, list[str]], seed: int) -> list[dict]:
    """One response per query id, seeded."""
    rng = random.Random(seed)
    others = sorted({w for k, v in association.items() for w in (k, *v)})
    out = []
    for number, item in enumerate(annotations, start=1):
        if item["type"] == "generative":
            pool = list(item.get("truth", [])) + list(item.get("hallu", [])) + rng.sample(others, 4)
            words = rng.sample(pool, min(len(pool), rng.randint(0, 6)))
            forms = [rng.choice([w, w + "s", w.capitalize(), w]) for w in words]
            clauses = [f"there is a {w}" if i % 2 == 0 else f"{w} near the window" for i, w in enumerate(forms)]
            text = ("In this image " + ", and ".join(clauses) + ".") if clauses else "A quiet scene."
            out.append({"id": number, "response": text})
        else:
            # mostly the exact "Yes" / "No" the official scorer reads, sometimes another form (counted wrong)
            answer = rng.choice(_ANSWERS[:2]) if rng.random() < 0.8 else rng.choice(_ANSWERS[2:])
            out.append({"id": number, "response": answer})
    return out


def official_figures(stdout: str) -> dict[tuple[str, ...], dict[str, float]]:
    """The official script's printed figures, by capdpo's JSON path of their section."""
    figures: dict[tuple[str, ...], dict[str, float]] = {}
    section: tuple[str, ...] | None = None
    for line in stdout.splitlines():
        if line.strip() in _SECTIONS:
            section = _SECTIONS[line.strip()]
            figures.setdefault(section, {})
            continue
        match = re.match(r"^\s*([A-Za-z0-9]+):\s+(-?[0-9.]+)\s*$", line)
        if match and section is not None:
            figures[section][match.group(1)] = float(match.group(2))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of the AMBER repository (inference.py, data/)")
    parser.add_argument("--nltk-data", default=os.environ.get("NLTK_DATA", ""), help="NLTK data folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--similarity", choices=["stub", "spacy"], default="stub")
    parser.add_argument("--out", default=None, help="also write the comparison as JSON")
    args = parser.parse_args()

    official = Path(args.official).resolve()
    data = official / "data"
    annotations = json.loads((data / "annotations.json").read_text(encoding="utf-8"))
    association = json.loads((data / "relation.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        answers = work / "responses.json"
        answers.write_text(json.dumps(responses(annotations, association, args.seed)), encoding="utf-8")
        env = {**os.environ, "NLTK_DATA": args.nltk_data}
        if args.similarity == "stub":
            (work / "spacy").mkdir()
            (work / "spacy" / "__init__.py").write_text(_STUB_SPACY)
            env["PYTHONPATH"] = os.pathsep.join([str(work), env.get("PYTHONPATH", "")])
        theirs = subprocess.run(
            [sys.executable, "inference.py", "--inference_data", str(answers), "--evaluation_type", "a"],
            cwd=official, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if theirs.returncode != 0:
            raise SystemExit(f"the official inference.py failed: {theirs.stderr.strip().splitlines()[-1:]}")
        ours_json = work / "ours.json"
        ours = subprocess.run(
            [sys.executable, str(ROOT / "eval" / "amber.py"), "--amber-dir", str(data), "--responses", str(answers),
             "--type", "a", "--out", str(ours_json), "--spacy-model", "en_core_web_lg",
             *(["--nltk-data", args.nltk_data] if args.nltk_data else [])],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if ours.returncode != 0:
            raise SystemExit(f"eval/amber.py failed: {ours.stderr.strip()}")
        mine = json.loads(ours_json.read_text(encoding="utf-8"))
        mine = mine.get("metrics", mine)

    rows, differ = [], 0
    expected = official_figures(theirs.stdout)
    for path, figures in expected.items():
        node = mine
        for key in path:
            node = node[key]
        for name, value in figures.items():
            got = node.get(name)
            same = got is not None and float(got) == value
            differ += not same
            rows.append({"section": ".".join(path) or "overall", "figure": name, "official": value, "capdpo": got})
            print(f"{'.'.join(path) or 'overall':<18} {name:<10} official {value:>6}  capdpo {got!s:>6}"
                  f"{'' if same else '  DIFFERENT'}")  # fmt: skip
    finish(
        rows,
        differ,
        f"on {len(annotations)} responses (seed {args.seed}, similarity {args.similarity})",
        official,
        args.out,
        seed=args.seed,
        similarity=args.similarity,
        responses=len(annotations),
    )


if __name__ == "__main__":
    main()
