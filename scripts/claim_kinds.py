"""How the synthetic weak model judges rule-based claims, by kind, and the sentences they come from.

    python scripts/claim_kinds.py [--images 60 --seed 777]

On fresh synthetic images: every object's true sentence and one corrupted version (`capdpo.synthetic.tasks.corrupt`)
are split by `rule_claims`; each claim is asked with the `claims` prompt. Prints the share of true sentences' claims
the model accepts per kind, and how often a sentence is judged right (true accepted, corrupted rejected) by `yesno`
and by the claim combinations. Numbers in docs/synthetic/results_issue20_h100_2026-12-05.md.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

from capdpo.generation.batching import Request, user_message
from capdpo.generation.engine import Engine
from capdpo.models.loading import load_vlm
from capdpo.synthetic.tasks import corrupt
from capdpo.synthetic.world import generate_world
from capdpo.validation.claims import rule_claims
from capdpo.validation.config import ValidateConfig
from capdpo.validation.methods import Claims, two_way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--model", default="models/synthetic/weak")
    parser.add_argument("--out", default="/tmp/claim_kinds_world")
    args = parser.parse_args()
    world = generate_world(args.out, {"test": args.images}, seed=args.seed)["test"]
    lm = load_vlm(args.model)
    engine = Engine(lm)
    cfg = ValidateConfig(methods=["claims"])
    method = Claims(lm, cfg)
    rng = random.Random(0)
    accepted: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    right: dict[str, int] = defaultdict(int)
    sentences = 0
    for item in world:
        asks: list[tuple[str, bool, str, str]] = []  # (sentence, true?, claim kind or "sentence", question text)
        for obj in item.scene.objects:
            for truth, sentence in ((True, obj.sentence()), (False, corrupt(item.scene, obj, rng).sentence)):
                for claim in rule_claims(sentence, cfg.claims_max):
                    asks.append(
                        (sentence, truth, claim["kind"], cfg.claims_prompt.replace("{question}", claim["question"]))
                    )
                asks.append((sentence, truth, "sentence", cfg.yesno_prompt.replace("{sentence}", sentence)))
        requests = [
            Request(key=str(i), image=item.image, messages=[user_message(text)]) for i, (*_, text) in enumerate(asks)
        ]
        results = engine.score(requests, 64)
        claims: dict[tuple[str, bool], list[tuple[str, float]]] = defaultdict(list)
        whole: dict[tuple[str, bool], float] = {}
        for request, (sentence, truth, kind, _) in zip(requests, asks):
            score = two_way(method.yes, method.no, results[request.key][0], "claims")[0]
            if kind == "sentence":
                whole[(sentence, truth)] = score
                continue
            claims[(sentence, truth)].append((kind, score))
            if truth:
                accepted[kind][0] += score >= 0.5
                accepted[kind][1] += 1
        for key, scored in claims.items():
            truth = key[1]
            scores = [s for _, s in scored]
            no_position = [s for k, s in scored if k != "position"] or scores
            sentences += 1
            right["yesno"] += (whole[key] >= 0.5) == truth
            right["claims min"] += (min(scores) >= 0.5) == truth
            right["claims mean"] += (sum(scores) / len(scores) >= 0.5) == truth
            right["claims min, no position claims"] += (min(no_position) >= 0.5) == truth
    print(
        "claims of true sentences accepted, by kind:",
        {k: f"{a}/{n} = {100 * a / n:.1f}%" for k, (a, n) in accepted.items()},
    )
    print(f"sentences judged right ({sentences}):", {k: f"{100 * v / sentences:.1f}%" for k, v in right.items()})


if __name__ == "__main__":
    main()
