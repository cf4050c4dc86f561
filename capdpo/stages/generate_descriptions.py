"""Stage 2: the strong model describes each image.

    python 2_generate_descriptions.py --config configs/demo.yaml [--max_new_tokens 256 ...]

Reads `01_images.jsonl`, writes `02_descriptions.jsonl`: one record per image × prompt × sample, with the text
split into sentences. A last sentence cut off by `max_new_tokens` is dropped (kept in `dropped_tail`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.generation.backends import model_id, open_backend
from capdpo.generation.batching import Request, user_message
from capdpo.generation.sampling import Generation, seed_of
from capdpo.jsonl import iter_jsonl, stable_id
from capdpo.records import DescriptionRecord, ImageRecord
from capdpo.run import Stage, run_units
from capdpo.sections import load_config
from capdpo.text import description_sentences


def plan_requests(images: list[ImageRecord], cfg: LoadedConfig) -> dict[str, tuple[Request, ImageRecord, str, int]]:
    """One request per image × prompt × sample, by description id: (request, image, prompt, sample index)."""
    sec = cfg.section
    gen = asdict(Generation.from_section(sec))
    model = model_id(cfg.section, cfg.common, "strong")  # with the adapter's content hash when strong_adapter is set
    planned = {}
    for image in images:
        for prompt in sec.prompts:
            for sample in range(sec.samples_per_image):
                rid = stable_id("describe", image.id, prompt, model, gen, sample, cfg.common.seed)
                request = Request(key=rid, image=image.path, messages=[user_message(prompt)], seed=seed_of(rid))
                planned[rid] = (request, image, prompt, sample)
    return planned


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Describe every image of stage 1's output; resumable."""
    stage = Stage("describe", cfg)
    stage.claim()  # one run of this stage per run directory at a time
    images = stage.read_records("images", ImageRecord, image_field="path")
    sec = cfg.section
    planned = plan_requests(images, cfg)
    gen = Generation.from_section(sec)
    gen_dict = asdict(gen)
    model = model_id(cfg.section, cfg.common, "strong")

    out = stage.open_output(set(planned))
    counts = {"descriptions": 0, "sentences": 0, "cut_tails_dropped": 0, "stopped_by_length": 0, "empty": 0}

    def describe(batch: list[Request]) -> list[dict[str, Any]]:
        records = []
        for output in engine.generate(batch, gen):
            request, image, prompt, sample = planned[output.key]
            sentences, tail = description_sentences(output.text, output.finish_reason)
            record = DescriptionRecord(
                id=output.key,
                image_id=image.id,
                image=image.path,
                prompt=prompt,
                text=output.text,
                sentences=sentences,
                model=model,
                generation={**gen_dict, "sample": sample, "seed": request.seed},
                finish_reason=output.finish_reason,
                dropped_tail=tail,
            )
            records.append(record.to_dict())
        return records

    if len(out.ids) < len(planned):  # load the model only when there is work left
        engine = open_backend(sec, cfg.common, "strong", **sec.decoder_options())
        units = engine.plan([p[0] for p in planned.values()], sec.batch_size)
        # the next batch's images are loaded and tokenised while the model describes this one
        prepare = getattr(engine, "prepare", None)
        run_units(units, out, lambda u: [r.key for r in u], describe, "describe", prepare=prepare)
        if hasattr(engine, "throughput"):  # a server: how fast it answered
            stage.counts["server"] = engine.throughput()
    out.close()
    if not stage.gather():
        return {}

    for record in iter_jsonl(stage.output):
        counts["descriptions"] += 1
        counts["sentences"] += len(record["sentences"])
        counts["cut_tails_dropped"] += bool(record["dropped_tail"])
        counts["stopped_by_length"] += record["finish_reason"] == "length"
        counts["empty"] += not record["sentences"]
    per = counts["sentences"] / max(counts["descriptions"], 1)
    summary = (
        f"{counts['descriptions']} descriptions of {len(images)} images by {model} "
        f"({len(sec.prompts)} prompt(s) × {sec.samples_per_image} sample(s)); {counts['sentences']} sentences "
        f"({per:.1f} per description); {counts['stopped_by_length']} hit the {sec.max_new_tokens}-token limit and "
        f"{counts['cut_tails_dropped']} cut-off last sentences were dropped; {counts['empty']} have no sentence."
    )
    return stage.finish(counts, summary)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("describe", a, __doc__)), argv)
