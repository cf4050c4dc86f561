"""Stage 3: the strong model rewrites every sentence of every description into `k` variants.

    python 3_regenerate_sentences.py --config configs/demo.yaml [--k 4 ...]

Reads `02_descriptions.jsonl`, writes `03_variants.jsonl`: one record per sentence. Each variant is sampled
with the image, the description so far and the sentence in the prompt; outputs are cleaned (preambles, list
markers, quotes, anything after the first sentence) and empty or duplicate variants — including copies of the
original — are dropped. The original sentence stays a candidate in stage 4.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.generation.backends import open_backend
from capdpo.generation.batching import Request, user_message
from capdpo.generation.sampling import Generation, seed_of
from capdpo.jsonl import iter_jsonl, stable_id
from capdpo.models.loading import role_model_id
from capdpo.records import DescriptionRecord, VariantRecord
from capdpo.run import Stage, run_units
from capdpo.sections import load_config
from capdpo.text import clean_variant, dedupe_variants, rewrite_prompt


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Write k variants for every sentence of stage 2's descriptions; resumable."""
    stage = Stage("variants", cfg)
    sec = cfg.section
    descriptions = [
        DescriptionRecord.from_dict(r, f"{stage.run_dir}/02_descriptions.jsonl") for r in stage.read_input("describe")
    ]
    gen = Generation.from_section(sec)
    settings = {**asdict(gen), "k": sec.k, "prompt": sec.prompt}
    model = role_model_id(cfg.common, "strong")  # with the adapter's content hash when strong_adapter is set
    # one unit of work = one sentence: its k requests always run in the same batch
    sentences: dict[str, tuple[DescriptionRecord, int, list[Request]]] = {}
    for desc in descriptions:
        for index, sentence in enumerate(desc.sentences):
            rid = stable_id("variants", desc.id, index, sentence, model, settings, cfg.common.seed)
            text = rewrite_prompt(sec.prompt, desc.sentences, index)
            requests = [
                Request(key=f"{rid}:{j}", image=desc.image, messages=[user_message(text)], seed=seed_of(rid, j))
                for j in range(sec.k)
            ]
            sentences[rid] = (desc, index, requests)

    out = stage.open_output(set(sentences))
    counts = {"sentences": 0, "variants_raw": 0, "variants_kept": 0, "empty": 0, "duplicates": 0}

    def rewrite(unit: list[str]) -> list[dict[str, Any]]:
        batch = [req for rid in unit for req in sentences[rid][2]]
        outputs = {o.key: o for o in engine.generate(batch, gen)}
        records = []
        for rid in unit:
            desc, index, requests = sentences[rid]
            raw = [outputs[r.key].text for r in requests]
            record = VariantRecord(
                id=rid,
                image_id=desc.image_id,
                image=desc.image,
                description_id=desc.id,
                prompt=desc.prompt,
                index=index,
                sentence=desc.sentences[index],
                context=desc.sentences,
                variants=dedupe_variants(desc.sentences[index], [clean_variant(t) for t in raw]),
                generation={**settings, "seeds": [r.seed for r in requests]},
                model=model,
                raw_variants=raw,
            )
            records.append(record.to_dict())
        return records

    if len(out.ids) < len(sentences):
        engine = open_backend("local", cfg.common, "strong", prefill_rows=sec.prefill_batch_size)
        per_unit = max(1, sec.batch_size // sec.k)
        order = sorted(
            sentences,
            key=lambda rid: (len(rewrite_prompt(sec.prompt, sentences[rid][0].sentences, sentences[rid][1])), rid),
        )
        units = [order[i : i + per_unit] for i in range(0, len(order), per_unit)]
        run_units(units, out, lambda u: u, rewrite, "variants")
    out.close()
    if not stage.gather():
        return {}

    for record in iter_jsonl(stage.output):
        counts["sentences"] += 1
        counts["variants_raw"] += len(record["raw_variants"])
        counts["variants_kept"] += len(record["variants"])
        cleaned = [clean_variant(t) for t in record["raw_variants"]]
        counts["empty"] += sum(1 for t in cleaned if not t)
        counts["duplicates"] += sum(1 for t in cleaned if t) - len(record["variants"])
    summary = (
        f"{counts['sentences']} sentences of {len(descriptions)} descriptions rewritten {sec.k}× by "
        f"{model}; {counts['variants_kept']} distinct variants kept of {counts['variants_raw']} "
        f"({counts['empty']} empty after cleaning, {counts['duplicates']} repeats or copies of the original)."
    )
    return stage.finish(counts, summary)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("variants", a, __doc__)), argv)
