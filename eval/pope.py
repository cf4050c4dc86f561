"""Score POPE answers with the same figures as POPE's own evaluate.py, per split, averaged and pooled.

    python eval/pope.py --answers EVAL_DIR/answers/pope.jsonl --questions DATA/POPE/output/coco --out EVAL_DIR/pope.json

`--questions`: the coco_pope_{random,popular,adversarial}.json files, or the folder that holds them.
Options: `python eval/pope.py --help` and `capdpo/evaluation/pope.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing capdpo

from capdpo.evaluation.pope import main  # noqa: E402

if __name__ == "__main__":
    main()
