"""Run a model (optionally with a trained LoRA adapter) over a benchmark and write that benchmark's answer file.

    python eval/answers.py --benchmark amber --model Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/demo/06_train/adapter \
        --data ../shared/data/amber/query/query_all.json --images DATA/AMBER/image --out runs/demo/eval/trained/answers/amber.json
    python eval/answers.py --benchmark mmhal --model ... --data DATA/MMHal-Bench/response_template.json \
        --images DATA/MMHal-Bench/images --out .../answers/mmhal.json
    python eval/answers.py --benchmark llava_bench --model ... --data DATA/llava-bench-in-the-wild/questions.jsonl \
        --images DATA/llava-bench-in-the-wild/images --out .../answers/llava_bench.jsonl
    python eval/answers.py --benchmark pope --model ... --data DATA/POPE/output/coco --images DATA/coco/val2014 \
        --out .../answers/pope.jsonl
    python eval/answers.py --benchmark coco --model ... --images DATA/coco/val2014 --num_images 500 \
        --data DATA/coco/annotations/instances_val2014.json --out .../answers/coco.json

Benchmarks (`capdpo.evaluation.benchmarks.BENCHMARKS`; each one's queries and answer file are in its own module)
and what `--out` gets:

* `amber` / `amber_g` / `amber_d`: AMBER queries (`query_all.json` or any `query_*.json`: `{id, image, query}`) over
  the image folder; `amber_g` keeps the generative queries (ids 1–1004), `amber_d` the discriminative ones.
  Output `[{"id", "response"}]`; discriminative responses are normalised to exactly "Yes" / "No" (what the AMBER
  scorer compares against), and answers that hold neither are kept verbatim and counted.
* `mmhal`: MMHal-Bench's question list (`response_template.json`); images are read from `--images` by the file
  name of `image_src` (or from `image_path`). Output: the same list with `model_answer` filled in.
* `llava_bench`: LLaVA-Bench's `questions.jsonl`; output JSONL with `question_id`, `prompt`, `text`, `answer_id`,
  `model_id`, `metadata`, as its review script reads them.
* `pope`: POPE's `coco_pope_<split>.json` question files (`--data`: one file or the folder of all splits), yes/no
  questions answered with the short token limit. Output JSONL with `question_id`, `split`, `image`, `prompt`,
  `text` and `answer` (the same text, under the key POPE's own script reads), `model_id`.
* `objhal`: Object HalBench's question file (RLAIF-V's `obj_halbench_300_with_image.jsonl`: `question`, `image_id`
  and the image as base64 `image`, written once by content to `<out stem>.images/`, or `image_path`; else
  `--images` + the COCO val2014 file name). Output JSONL with `question_id` (line index), `image_id`, `prompt`,
  `text`, `model_id`, the fields RLAIF-V's scorer reads.
* `coco`: COCO images for CHAIR, from a COCO annotation file's `images` list (or every image in the folder, ids
  from the file names), optionally a seeded sample of `--num_images`. Output `[{"image_id", "caption"}]`.

Resumable like the pipeline stages: every answer is appended to `<out stem>.work.jsonl` (keyed by question id)
as its batch finishes; a rerun skips answered questions, and the answer file itself is written atomically at
the end. Greedy decoding unless `--temperature` is set.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import BENCHMARKS, Query, model_label
from capdpo.evaluation.config import AnswersConfig
from capdpo.generation.sampling import Generation
from capdpo.generation.server import served_model_id
from capdpo.jsonl import JsonlAppender, iter_jsonl, stable_id, write_json
from capdpo.provenance import provenance
from capdpo.run import progress
from capdpo.sections import load_config


# ---- the run ----------------------------------------------------------------------------------------------
def side_path(out: str | Path, suffix: str) -> Path:
    """`<out stem><suffix>` beside `out` (answers/amber.json -> answers/amber.work.jsonl)."""
    out = Path(out)
    return out.with_name(out.name.rsplit(".", 1)[0] + suffix)


def open_work_file(path: Path, settings: str) -> JsonlAppender:
    """Open the work file; refuse one that holds answers made with other settings (model, adapter, prompts...)."""
    if path.exists():
        for number, record in enumerate(iter_jsonl(path, allow_torn_tail=True), start=1):
            if record.get("settings") != settings:
                raise InputError(
                    f"{path}:{number}: holds answers made with other settings (model, adapter, generation or "
                    "prompts); use another --out / --work_file, or delete it to start over"
                )
    return JsonlAppender(path)


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Answer every query of the benchmark that the work file does not hold yet, then write the answer file."""
    sec: AnswersConfig = cfg.section
    for name in ("benchmark", "model", "out"):
        if not getattr(sec, name):
            raise ConfigError(f"answers: --{name} is required")
    benchmark = BENCHMARKS[sec.benchmark]
    queries, context = benchmark.load("queries")(sec, cfg.common.seed)
    seen: set[str] = set()
    for q in queries:
        if q.key in seen:
            raise InputError(f"{sec.data or sec.images}: question id {q.key} appears twice")
        seen.add(q.key)
    if sec.limit:
        queries = queries[: sec.limit]
    if not queries:
        raise InputError(f"{sec.data or sec.images}: no {sec.benchmark} queries to answer")
    missing = [q.image for q in queries if not q.image.is_file()]
    if missing:
        raise InputError(
            f"{missing[0]}: image not found ({len(missing)} of {len(queries)} queries lack their image; "
            f"check --images {sec.images})"
        )

    long_gen = Generation(sec.max_new_tokens, sec.temperature, sec.top_p, sec.top_k, sec.repetition_penalty)
    short_gen = Generation(sec.yes_no_max_new_tokens, sec.temperature, sec.top_p, sec.top_k, sec.repetition_penalty)
    family = "amber" if sec.benchmark.startswith("amber") else sec.benchmark
    # the answering model: the configured one, or (through a server) the backend and served name
    model = sec.model if sec.backend == "local" else served_model_id(sec, sec.model)
    settings = stable_id(
        "answers", family, model, sec.adapter, asdict(long_gen), asdict(short_gen), sec.query_suffix,
        sec.yes_no_suffix, sec.caption_prompt, cfg.common.seed, cfg.common.min_pixels, cfg.common.max_pixels,
    )  # fmt: skip
    work_path = Path(sec.work_file) if sec.work_file else side_path(sec.out, ".work.jsonl")
    work = open_work_file(work_path, settings)
    resumed = sum(q.key in work.ids for q in queries)
    try:
        if resumed < len(queries):  # load the model only when there is work left
            _generate(cfg, queries, work, settings, long_gen, short_gen)
    finally:
        work.close()

    done = {r["id"]: r for r in iter_jsonl(work_path)}
    lacking = [q.key for q in queries if q.key not in done]
    if lacking:
        raise InputError(f"{work_path}: {len(lacking)} queries still unanswered (first: {lacking[0]}); rerun")
    answers = [done[q.key] for q in queries]
    stats = benchmark.load("write")(sec, queries, answers, context)
    stats.update(queries=len(queries), resumed=resumed, generated=len(queries) - resumed)
    stats["stopped_by_length"] = sum(a["finish_reason"] == "length" for a in answers)
    write_json(
        side_path(sec.out, ".meta.json"), {**provenance(cfg.resolved()), "stats": stats, "work_file": str(work_path)}
    )
    unrecognised = stats.get("yes_no_unrecognised", 0)
    yes_no = (
        f" yes/no answers: {stats['yes']} Yes, {stats['no']} No, {unrecognised} neither (kept verbatim)."
        if "yes" in stats
        else ""
    )
    print(
        f"[answers] {sec.benchmark}: {len(queries)} answers ({resumed} resumed) by "
        f"{model_label(sec.model, sec.adapter, sec.model_id)}.{yes_no} "
        f"Output: {sec.out}",
        flush=True,
    )
    return stats


def _generate(
    cfg: LoadedConfig, queries: list[Query], work: JsonlAppender, settings: str, long_gen: Any, short_gen: Any
) -> None:
    from capdpo.generation.backends import open_backend
    from capdpo.generation.batching import Request, user_message
    from capdpo.generation.sampling import seed_of

    sec: AnswersConfig = cfg.section
    engine = open_backend(sec, cfg.common, "answers", model=sec.model, adapter=sec.adapter)
    by_key = {q.key: q for q in queries}
    done = sum(q.key in work.ids for q in queries)
    with progress(len(queries), done, f"answers {sec.benchmark}") as bar:
        for gen, group in (
            (long_gen, [q for q in queries if not q.yes_no]),
            (short_gen, [q for q in queries if q.yes_no]),
        ):
            requests = [
                Request(
                    key=q.key, image=str(q.image), messages=[user_message(q.prompt)], seed=seed_of(settings, q.key)
                )
                for q in group
            ]
            # Batches are planned over every query, answered or not, so a resumed run pads and batches each
            # unfinished query exactly as an uninterrupted run would.
            for batch in engine.plan(requests, sec.batch_size):
                if all(r.key in work.ids for r in batch):
                    continue
                records = []
                for output in engine.generate(batch, gen):
                    q = by_key[output.key]
                    records.append(
                        {
                            "id": q.key,
                            "question_id": q.question_id,
                            "settings": settings,
                            "prompt": q.prompt,
                            "text": output.text,
                            "finish_reason": output.finish_reason,
                        }
                    )
                bar.update(work.write(records))


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("answers", a, __doc__)), argv)
