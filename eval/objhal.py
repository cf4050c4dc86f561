"""Score Object HalBench answers as RLAIF-V's eval_gpt_obj_halbench.py + summarize_gpt_obj_halbench_review.py do.

    python eval/objhal.py --answers EVAL_DIR/answers/objhal.jsonl --coco_annotations DATA/coco/annotations \
        --synonyms RLAIF-V/eval/data/synonyms_refine.txt --prompt objhal_extraction_prompt.txt \
        --judge_url https://api.openai.com/v1 --judge_model gpt-3.5-turbo-0613 --out EVAL_DIR/objhal.json

Options: `python eval/objhal.py --help` and `capdpo/evaluation/objhal.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing capdpo

from capdpo.evaluation.objhal import main  # noqa: E402

if __name__ == "__main__":
    main()
