"""Stage 3: the strong model rewrites every sentence of every description into `k` distinct variants.

    python 3_regenerate_sentences.py --config configs/demo.yaml [--k 4 --max_rounds 3 ...]

Reads `02_descriptions.jsonl`, writes `03_variants.jsonl`: one record per sentence. Each variant is sampled
with the image, the description so far and the sentence in the prompt; outputs are cleaned (preambles, list
markers, quotes, anything after the first sentence) and empty outputs, repeats and copies of the original are
dropped, where two sentences are the same when they say the same words apart from case, punctuation and
function words ("There is a red circle." = "A red circle."). A sentence left with fewer than `k` usable
rewrites (fragments do not count) is asked again for the missing ones, at a higher temperature, up to
`max_rounds` rounds. Every sample is seeded by its record, round and index, so a rerun after a crash gives the
same records. The original sentence stays a candidate in stage 4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.generation.backends import model_id, open_backend
from capdpo.generation.batching import Request, user_message
from capdpo.generation.sampling import Generation, seed_of
from capdpo.jsonl import iter_jsonl, stable_id
from capdpo.records import DescriptionRecord, VariantRecord
from capdpo.run import Stage, run_units
from capdpo.sections import load_config
from capdpo.text import clean_variant, dedupe_variants, fragment_reason, rewrite_prompt


@dataclass
class Sentence:
    """One sentence to rewrite and what its rounds have produced so far."""

    desc: DescriptionRecord
    index: int
    prompt: str
    raw: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    seen: set[tuple[str, ...]] = field(default_factory=set)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sentence(self) -> str:
        return self.desc.sentences[self.index]

    def usable(self, min_words: int) -> int:
        return sum(fragment_reason(v, min_words) is None for v in self.variants)


def round_generation(sec: Any, round_number: int) -> Generation:
    """Sampling settings of round `round_number` (1-based): the configured ones, warmer in later rounds."""
    gen = Generation.from_section(sec)
    return replace(gen, temperature=gen.temperature + (round_number - 1) * sec.round_temperature_step)


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Write up to k distinct variants for every sentence of stage 2's descriptions; resumable."""
    stage = Stage("variants", cfg)
    stage.claim()  # one run of this stage per run directory at a time
    sec = cfg.section
    descriptions = stage.read_records("describe", DescriptionRecord, image_field="image")
    settings: dict[str, Any] = {**asdict(Generation.from_section(sec)), "k": sec.k, "prompt": sec.prompt}
    if sec.max_rounds > 1:  # one round is what earlier versions did: their record ids stay valid
        settings.update(max_rounds=sec.max_rounds, step=sec.round_temperature_step, min_words=sec.min_words)
    model = model_id(cfg.section, cfg.common, "strong")  # with the adapter's content hash when strong_adapter is set
    # one unit of work = a few sentences: all rounds of a sentence run in the same unit
    sentences: dict[str, tuple[DescriptionRecord, int]] = {}
    for desc in descriptions:
        for index, sentence in enumerate(desc.sentences):
            rid = stable_id("variants", desc.id, index, sentence, model, settings, cfg.common.seed)
            sentences[rid] = (desc, index)

    out = stage.open_output(set(sentences))

    def rewrite(unit: list[str]) -> list[dict[str, Any]]:
        work = {
            rid: Sentence(*sentences[rid], rewrite_prompt(sec.prompt, sentences[rid][0].sentences, sentences[rid][1]))
            for rid in unit
        }
        for round_number in range(1, sec.max_rounds + 1):
            wanted = {rid: sec.k - s.usable(sec.min_words) for rid, s in work.items()}
            requests = []
            for rid, n in wanted.items():
                for j in range(n if round_number > 1 else sec.k):
                    # round 1 keeps the seeds (and keys) one-round runs always had
                    seed = seed_of(rid, j) if round_number == 1 else seed_of(rid, round_number, j)
                    key = f"{rid}:{j}" if round_number == 1 else f"{rid}:{round_number}:{j}"
                    requests.append(
                        Request(
                            key=key, image=work[rid].desc.image, messages=[user_message(work[rid].prompt)], seed=seed
                        )
                    )
            if not requests:
                break
            gen = round_generation(sec, round_number)
            outputs = {o.key: o.text for o in engine.generate(requests, gen)}
            by_sentence: dict[str, list[Request]] = {}
            for request in requests:
                by_sentence.setdefault(request.key.split(":", 1)[0], []).append(request)
            for rid, asked in by_sentence.items():
                s = work[rid]
                raw = [outputs[r.key] for r in asked]
                added = dedupe_variants(s.sentence, [clean_variant(t) for t in raw], s.seen)
                s.raw += raw
                s.seeds += [r.seed for r in asked]
                s.variants += added
                s.rounds.append(
                    {"round": round_number, "temperature": gen.temperature, "samples": len(raw), "added": len(added)}
                )
        records = []
        for rid, s in work.items():
            record = VariantRecord(
                id=rid,
                image_id=s.desc.image_id,
                image=s.desc.image,
                description_id=s.desc.id,
                prompt=s.desc.prompt,
                index=s.index,
                sentence=s.sentence,
                context=s.desc.sentences,
                variants=s.variants,
                generation={**settings, "seeds": s.seeds},
                model=model,
                raw_variants=s.raw,
                rounds=s.rounds,
            )
            records.append(record.to_dict())
        return records

    if len(out.ids) < len(sentences):
        engine = open_backend(sec, cfg.common, "strong", **sec.decoder_options())
        per_unit = max(1, sec.batch_size // sec.k)
        order = sorted(
            sentences,
            key=lambda rid: (len(rewrite_prompt(sec.prompt, sentences[rid][0].sentences, sentences[rid][1])), rid),
        )
        units = [order[i : i + per_unit] for i in range(0, len(order), per_unit)]
        run_units(units, out, lambda u: u, rewrite, "variants")
        if hasattr(engine, "throughput"):  # a server: how fast it answered
            stage.counts["server"] = engine.throughput()
    out.close()
    if not stage.gather():
        return {}
    counts = variant_stats(iter_jsonl(stage.output), sec)
    summary = (
        f"{counts['sentences']} sentences of {len(descriptions)} descriptions rewritten by {model} "
        f"(k={sec.k}, up to {sec.max_rounds} round(s)); {counts['variants_kept']} distinct variants kept of "
        f"{counts['variants_raw']} samples ({counts['empty']} empty after cleaning, {counts['duplicates']} repeats or "
        f"copies of the original). Distinct usable rewrites per sentence: {counts['usable_per_sentence_round1']:.2f} "
        f"after round 1, {counts['usable_per_sentence']:.2f} in the end; each round added {counts['added_by_round']}; "
        f"{counts['sentences_without_a_rewrite']} sentences have no usable rewrite."
    )
    return stage.finish(counts, summary)


def variant_stats(records: Any, sec: Any) -> dict[str, Any]:
    """Counts over stage 3's records: samples, kept variants, what each round added, usable rewrites per sentence
    after the first round and in the end."""
    counts: dict[str, Any] = {"sentences": 0, "variants_raw": 0, "variants_kept": 0, "empty": 0, "duplicates": 0}
    added_by_round = [0] * sec.max_rounds
    usable_round1 = usable = without = 0
    for record in records:
        counts["sentences"] += 1
        counts["variants_raw"] += len(record["raw_variants"])
        counts["variants_kept"] += len(record["variants"])
        cleaned = [clean_variant(t) for t in record["raw_variants"]]
        counts["empty"] += sum(1 for t in cleaned if not t)
        counts["duplicates"] += sum(1 for t in cleaned if t) - len(record["variants"])
        good = [fragment_reason(v, sec.min_words) is None for v in record["variants"]]
        first = record["rounds"][0]["added"] if record.get("rounds") else len(record["variants"])
        usable_round1 += sum(good[:first])
        usable += sum(good)
        without += not any(good)
        for entry in record.get("rounds") or [{"round": 1, "added": len(record["variants"])}]:
            added_by_round[entry["round"] - 1] += entry["added"]
    n = max(counts["sentences"], 1)
    counts.update(
        added_by_round=added_by_round,
        usable_per_sentence_round1=usable_round1 / n,
        usable_per_sentence=usable / n,
        sentences_without_a_rewrite=without,
    )
    return counts


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("variants", a, __doc__)), argv)
