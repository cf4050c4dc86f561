"""Check capdpo's POPE scorer against POPE's own `evaluate.py` on the same answers.

    python scripts/check_pope_official.py --official PATH/TO/POPE --questions PATH/TO/POPE/output/coco

`--official` is a checkout of the POPE repository (its `evaluate.py`, which reads the two file paths set at its top),
`--questions` the coco_pope_{random,popular,adversarial}.json files or their folder; capdpo ships neither. For each
question file the script writes one seeded answer per question, in many forms ("Yes", "No, there is not.", "I do
not think so", "There is a dog, not a cat.", ...), runs the official script on it (its source with the two paths
filled in) and `eval/pope.py`, and compares the confusion counts and every printed figure. Exit code 0 when all are
equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from official_compare import finish  # noqa: E402

ANSWERS = [
    "Yes", "No", "yes", "no", "Yes, there is.", "No, there is not.", "No.", "There is no dog in the image.",
    "There is not a cat.", "I do not think so", "Not at all", "NO", "Nope", "Yes. No.", "The answer is no",
    "There is a dog, not a cat.", "Yes there is a car", "no, it is not", "I cannot tell", "",
]  # fmt: skip
# the official script's printed lines -> capdpo's figure names
_PRINTED = {"Accuracy": "accuracy", "Precision": "precision", "Recall": "recall", "F1 score": "f1",
            "Yes ratio": "yes_ratio"}  # fmt: skip


def official_figures(stdout: str) -> dict[str, float]:
    """TP/FP/TN/FN and the five figures the official script prints."""
    lines = stdout.splitlines()
    at = lines.index("TP\tFP\tTN\tFN\t")
    counts = dict(zip(("TP", "FP", "TN", "FN"), (int(v) for v in lines[at + 1].split("\t")), strict=True))
    figures = {}
    for line in lines[at + 2 :]:
        name, _, value = line.partition(": ")
        if name in _PRINTED:
            figures[_PRINTED[name]] = float(value)
    return {**counts, **figures}


def run_official(source: str, answers: Path, labels: Path) -> dict[str, float]:
    """The official script's figures, its two file paths set to `answers` and `labels`."""
    code = re.sub(r"^ans_file = ''$", f"ans_file = {str(answers)!r}", source, count=1, flags=re.M)
    code = re.sub(r"^label_file = ''$", f"label_file = {str(labels)!r}", code, count=1, flags=re.M)
    if code.count(repr(str(answers))) != 1 or code.count(repr(str(labels))) != 1:
        raise SystemExit("evaluate.py does not set ans_file = '' and label_file = '' at its top as expected")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the official evaluate.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return official_figures(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of the POPE repository (evaluate.py)")
    parser.add_argument("--questions", required=True, help="the coco_pope_*.json files or their folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the comparison as JSON")
    args = parser.parse_args()

    source = (Path(args.official) / "evaluate.py").read_text(encoding="utf-8")
    folder = Path(args.questions)
    files = sorted(folder.glob("coco_pope_*.json")) if folder.is_dir() else [folder]
    rng = random.Random(args.seed)
    rows, differ = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for labels in files:
            questions = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
            answers = Path(tmp) / f"answers_{labels.stem}.jsonl"
            answers.write_text("".join(json.dumps({"question_id": q["question_id"], "answer": rng.choice(ANSWERS)})
                                       + "\n" for q in questions), encoding="utf-8")  # fmt: skip
            theirs = run_official(source, answers, labels)
            out = Path(tmp) / f"capdpo_{labels.stem}.json"
            done = subprocess.run(
                [sys.executable, str(ROOT / "eval" / "pope.py"), "--answers", str(answers), "--questions",
                 str(labels), "--out", str(out)],
                cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"eval/pope.py failed: {done.stderr.strip()}")
            ours = next(iter(json.loads(out.read_text())["splits"].values()))
            for name, value in theirs.items():
                same = ours.get(name) == value
                differ += not same
                rows.append({"file": labels.name, "figure": name, "official": value, "capdpo": ours.get(name)})
                print(f"{labels.name:<28} {name:<10} official {value!s:<20} capdpo {ours.get(name)!s:<20}"
                      f"{'' if same else 'DIFFERENT'}")  # fmt: skip
    finish(
        rows,
        differ,
        f"over {len(files)} question file(s) (seed {args.seed})",
        args.official,
        args.out,
        seed=args.seed,
        question_files=[f.name for f in files],
    )


if __name__ == "__main__":
    main()
