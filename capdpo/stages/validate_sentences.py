"""Stage 4: the weak model scores every candidate sentence against its image.

    python 4_validate_sentences.py --config configs/demo.yaml [--methods yesno rating --weights 1 0.5 ...]

Reads `03_variants.jsonl`, writes `04_scores.jsonl`: per sentence, the original and its variants as candidates
with a score in [0, 1] (1 = accurate) and each method's raw numbers. Methods: `yesno` (default), `rating`,
`pairwise`, `claims` (atomic claims, each a yes/no question; decompositions cached in
`04_scores.claims.jsonl`); several combine by weighted mean. Scores come from forward passes only: deterministic.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.generation.backends import model_id, open_backend
from capdpo.generation.config import BackendConfig
from capdpo.jsonl import iter_jsonl, stable_id
from capdpo.records import Candidate, ScoreRecord, VariantRecord
from capdpo.run import Stage, owned_units, run_units
from capdpo.sections import load_config
from capdpo.validation.validator import Validator


def candidates_of(record: VariantRecord) -> list[str]:
    """The original sentence first, then its variants."""
    return [record.sentence, *record.variants]


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Score the candidates of every sentence of stage 3's output; resumable."""
    stage = Stage("validate", cfg)
    stage.claim()  # one run of this stage per run directory at a time
    sec = cfg.section
    records = stage.read_records("variants", VariantRecord, image_field="image")
    # settings that change scores define the record ids; batch size and the shared-prefix switch do not
    # (nor how the model is reached: the backend enters through the model's name)
    speed_only = {"batch_size", "shared_prefix", "images_per_pass", *(f.name for f in fields(BackendConfig))}
    if sec.backend == "local":
        speed_only.add("server_top_logprobs")
    speed_only |= {"claims_base_url", "claims_key_env"}  # how the decomposer is reached (its id says which)
    settings = {k: v for k, v in asdict(sec).items() if k not in speed_only}
    if "claims" not in sec.methods:  # runs without claims keep the record ids they always had
        settings = {k: v for k, v in settings.items() if not k.startswith("claims_")}
    weak = model_id(sec, cfg.common, "weak")
    validator_info = {"model": weak, **settings}
    planned = {stable_id("validate", r.id, candidates_of(r), weak, settings): r for r in records}

    out = stage.open_output(set(planned))

    def score(unit: list[str]) -> list[dict[str, Any]]:
        jobs = {rid: validator.jobs(rid, planned[rid].image, candidates_of(planned[rid])) for rid in unit}
        requests = [job.request for rid in unit for job in jobs[rid]]
        results = engine.score(requests, sec.batch_size, keep=validator.reads())
        written = []
        for rid in unit:
            record = planned[rid]
            texts = candidates_of(record)
            scored = validator.combine(texts, jobs[rid], results)
            candidates = [
                Candidate(text=t, is_original=i == 0, score=s, details=d)
                for i, (t, (s, d)) in enumerate(zip(texts, scored))
            ]
            written.append(
                ScoreRecord(
                    id=rid,
                    image_id=record.image_id,
                    image=record.image,
                    variants_id=record.id,
                    description_id=record.description_id,
                    prompt=record.prompt,
                    index=record.index,
                    context=record.context,
                    candidates=candidates,
                    validator=validator_info,
                ).to_dict()
            )
        return written

    def plan(validator: Validator) -> list[list[str]]:
        # a unit groups whole sentences until it holds about four batches of requests (claims counted as four
        # requests per candidate, so the plan never depends on what has been decomposed yet)
        units: list[list[str]] = [[]]
        size = 0
        for rid, record in planned.items():
            units[-1].append(rid)
            size += validator.request_estimate(rid, record.image, candidates_of(record))
            if size >= 4 * sec.batch_size:
                units.append([])
                size = 0
        return [u for u in units if u]

    if len(out.ids) < len(planned):
        decompositions = {}
        if "claims" in sec.methods:  # decomposed before the weak model loads
            if "rating" in sec.methods:  # rating's plan needs the weak model: every rank takes every unfinished one
                todo = [r for rid, r in planned.items() if rid not in out.ids]
            else:  # the sentences of this rank's unfinished units only
                mine = owned_units(plan(Validator(None, sec)), lambda u: u)
                todo = [planned[rid] for u in mine if not out.ids.issuperset(u) for rid in u]
            decompositions = decompose_candidates(stage, cfg, todo)
        engine = open_backend(
            sec, cfg.common, "weak", shared_prefix=sec.shared_prefix, images_per_pass=sec.images_per_pass
        )
        validator = Validator(getattr(engine, "lm", None), sec)
        for method in validator.methods:
            if hasattr(method, "decompositions"):
                method.decompositions = decompositions
        units = plan(validator)
        run_units(units, out, lambda u: u, score, "validate")
        if hasattr(engine, "throughput"):  # a server: how fast it answered
            stage.counts["server"] = engine.throughput()
    out.close()
    if not stage.gather():
        return {}

    counts = {"sentences": 0, "candidates": 0, "originals_best": 0, "variants_beat_original": 0}
    gaps = []
    for record in iter_jsonl(stage.output):
        scores = [c["score"] for c in record["candidates"]]
        counts["sentences"] += 1
        counts["candidates"] += len(scores)
        counts["originals_best"] += scores[0] >= max(scores)
        counts["variants_beat_original"] += any(s > scores[0] for s in scores[1:])
        gaps.append(max(scores) - min(scores))
    mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
    summary = (
        f"{counts['candidates']} candidates of {counts['sentences']} sentences scored by {weak} "
        f"with {', '.join(sec.methods)}; the original scored best for {counts['originals_best']} sentences and a "
        f"variant beat it for {counts['variants_beat_original']}; mean best-worst gap {mean_gap:.3f}."
    )
    return stage.finish({**counts, "mean_gap": mean_gap}, summary)


def decompose_candidates(stage: Stage, cfg: LoadedConfig, records: list[VariantRecord]) -> dict[str, Any]:
    """Claims of every candidate of `records` (sentence -> claims), decomposed where the cache lacks them."""
    import gc

    from capdpo.run import shard
    from capdpo.validation.claims import ClaimCache, Decomposer

    sec = cfg.section
    identity, opener = decomposer_of(sec, cfg.common)
    decomposer = Decomposer(sec, identity, opener)
    cache = ClaimCache(stage.run_dir, *shard())
    sentences = {text for record in records for text in candidates_of(record)}
    stage.counts["claims_decomposed"] += decomposer.fill(cache, sentences, sec.batch_size)
    gc.collect()  # the decomposer model goes before the weak model loads
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return {text: decomposer.claims_of(cache, text) for text in sentences}


def decomposer_of(sec: Any, common: Any) -> tuple[str, Any]:
    """(how records name the claim decomposer, a function opening its backend or None for the rules)."""
    from capdpo.generation.backends import BACKENDS

    name = sec.claims_decomposer
    if name == "rules":
        return "rules", None
    if sec.claims_base_url:
        from capdpo.generation.config import BackendConfig

        server = BackendConfig(
            backend="openai",
            base_url=sec.claims_base_url,
            server_model="" if name in ("strong", "weak") else name,
            server_key_env=sec.claims_key_env,
            max_concurrency=sec.max_concurrency,
            request_timeout=sec.request_timeout,
            max_retries=sec.max_retries,
        )
        role = name if name in ("strong", "weak") else "strong"
        return model_id(server, common, role), lambda: BACKENDS["openai"](common, role, server)
    if name in ("strong", "weak"):
        return model_id(sec, common, name), lambda: open_backend(sec, common, name)
    return name, lambda: BACKENDS["local"](common, "strong", sec, model=name)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("validate", a, __doc__)), argv)
