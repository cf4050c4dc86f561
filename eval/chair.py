"""CHAIR_s / CHAIR_i / object recall, BLEU and ROUGE-L of captions of COCO images.

    NLTK_DATA=../shared/data/nltk_data python eval/chair.py --captions EVAL_DIR/answers/coco.json \
        --coco-instances COCO/annotations/instances_val2014.json \
        --coco-captions COCO/annotations/captions_val2014.json --out EVAL_DIR/chair.json

With capdpo's VLM critic (a 0-100 score per caption from a judge that sees the image and the references; a local
model, or an OpenAI-compatible endpoint with --critic_url URL --critic_model NAME):

    python eval/chair.py ... --coco-images COCO/val2014 --critic vlm --critic-model MODELS/llava-critic-7b-hf \
        --out EVAL_DIR/chair.json   # replies cached in EVAL_DIR/chair.critic_cache.jsonl

Options (several annotation files, a critic score, per-caption details): `python eval/chair.py --help`,
`capdpo/evaluation/chair.py` and `capdpo/evaluation/critic.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing capdpo

from capdpo.evaluation.chair import main  # noqa: E402

if __name__ == "__main__":
    main()
