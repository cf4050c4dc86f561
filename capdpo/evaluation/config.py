"""Config sections of the evaluation commands (`answers:`, `mmhal:`, `llava_bench:`, `report:`), which a run
YAML may carry like the stages' sections. Kept free of heavy imports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from capdpo.config import option, require_choice
from capdpo.errors import ConfigError
from capdpo.evaluation.benchmarks import BENCHMARKS
from capdpo.generation.config import BackendConfig


@dataclass
class JudgeConfig:
    """How a judge is reached and how its replies are cached (shared by the MMHal and LLaVA-Bench sections)."""

    judge_url: str = option(
        "Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 (requests go to <url>/chat/completions).",
        "",
    )
    judge_model: str = option("Model name sent to the endpoint, e.g. gpt-4-0613.", "")
    api_key_env: str = option(
        "Name of the environment variable that holds the API key (sent as a Bearer token; never printed or "
        "written). Unset variable: no Authorization header (local servers).",
        "OPENAI_API_KEY",
    )
    judge_local: str = option("Local model folder or hub id used as the judge instead of an endpoint (text only).", "")
    prompt: str = option(
        "Judge prompt file: the benchmark's own (MMHal-Bench's published template, LLaVA-Bench's rule.json, Object "
        "HalBench's extraction prompt) or a capdpo prompt file (default: the benchmark's file in eval/prompts/).",
        "",
    )
    protocol: str = option(
        "published: the benchmark's own prompt file, message layout, temperature, reply parsing and rounding, so "
        "every figure equals the published scripts'; capdpo: capdpo's stricter parsing (see the README). Empty: "
        "published when the benchmark's own prompt file is given, else capdpo.",
        "",
    )
    judge_temperature: float = option(
        "Judge sampling temperature (-1: the protocol's: 0.2 for LLaVA-Bench's published protocol, else 0).", -1.0
    )
    judge_max_tokens: int = option(
        "Token limit of one judge reply (0: none sent; -1: the protocol's: 1024, none for MMHal-Bench's published "
        "protocol; a local judge without a limit gets 1024).",
        -1,
    )
    timeout: float = option("Seconds to wait for one HTTP reply before retrying.", 120.0)
    max_retries: int = option("Retries of one request on HTTP 429/5xx, timeouts and connection errors.", 6)
    backoff: float = option("First retry delay in seconds; doubled after every failure (capped at 60 s).", 2.0)
    workers: int = option("Concurrent HTTP requests.", 4)
    judge_batch_size: int = option("Prompts per generate call of a local judge.", 4)
    cache: str = option("Judge reply cache (JSONL; default: <out stem>.judge_cache.jsonl beside --out).", "")

    def __post_init__(self) -> None:
        if self.judge_url and self.judge_local:
            raise ConfigError("judge_url / judge_local: give one judge, not both")
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge_url: '{self.judge_url}' must start with http:// or https://")
        if self.judge_max_tokens < -1 or self.workers < 1 or self.judge_batch_size < 1 or self.max_retries < 0:
            raise ConfigError("judge_max_tokens >= -1, workers and judge_batch_size >= 1, max_retries >= 0")
        if (self.judge_temperature < 0 and self.judge_temperature != -1) or self.timeout <= 0 or self.backoff < 0:
            raise ConfigError("judge_temperature must be >= 0 (or -1: the protocol's), backoff >= 0, timeout > 0")
        if self.protocol not in ("", "published", "capdpo"):
            raise ConfigError(f"protocol: '{self.protocol}' is not one of published, capdpo")

    def use_protocol(self, published_file: bool, published: tuple[float, int], capdpo: tuple[float, int]) -> str:
        """Settle `protocol` (published when the benchmark's own prompt file is given) and fill the sampling
        settings left at their defaults with the protocol's (temperature, max_tokens); max_tokens 0 sends no limit
        (a local judge then gets 1024)."""
        if not self.protocol:
            self.protocol = "published" if published_file else "capdpo"
        temperature, max_tokens = published if self.protocol == "published" else capdpo
        if self.judge_temperature == -1:
            self.judge_temperature = temperature
        if self.judge_max_tokens == -1:
            self.judge_max_tokens = max_tokens
        return self.protocol


@dataclass
class AnswersConfig(BackendConfig):
    """Benchmark answers (`answers:` section)."""

    section: ClassVar[str] = "answers"

    benchmark: str = option(f"Which benchmark: {', '.join(BENCHMARKS)}.", "")
    model: str = option("Base model: hub id or local folder.", "")
    adapter: str = option("Trained PEFT adapter folder applied on top of the base model (empty: the base alone).", "")
    data: str = option(
        "Queries: AMBER query_*.json, MMHal response_template.json, LLaVA-Bench questions.jsonl, POPE's "
        "coco_pope_<split>.json or the folder of them, or (coco, optional) a COCO annotation json whose 'images' list "
        "names the images.",
        "",
    )
    images: str = option("Folder holding the benchmark's images.", "")
    out: str = option("Answer file to write, in the benchmark's own format.", "")
    work_file: str = option("Append-only progress file (default: <out stem>.work.jsonl beside --out).", "")
    model_id: str = option("Model name written into LLaVA-Bench answers (default: model folder name [+ adapter]).", "")
    caption_prompt: str = option("coco: the instruction each image gets.", "Please describe this image in detail.")
    query_suffix: str = option("Text appended to every benchmark question (e.g. a format hint); empty: none.", "")
    yes_no_suffix: str = option(
        "Text appended to AMBER's discriminative (yes/no) questions only, e.g. ' Answer yes or no.'.", ""
    )
    num_images: int = option("coco: answer a seeded sample of this many images (0: all).", 0)
    limit: int = option("Answer only the first N queries (smoke tests; 0: all).", 0)
    max_new_tokens: int = option("Token limit of one answer.", 512)
    yes_no_max_new_tokens: int = option("Token limit of an AMBER discriminative (yes/no) answer.", 16)
    temperature: float = option("Sampling temperature; 0 means greedy.", 0.0)
    top_p: float = option("Nucleus sampling mass (temperature > 0).", 1.0)
    top_k: int = option("Keep only the k most likely tokens (0: off; temperature > 0).", 0)
    repetition_penalty: float = option("Penalty on repeated tokens (1.0: off).", 1.0)
    batch_size: int = option("Requests per generate call; halves on CUDA out-of-memory.", 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.benchmark:
            require_choice("answers.benchmark", self.benchmark, BENCHMARKS)
        if self.max_new_tokens < 1 or self.yes_no_max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("answers: max_new_tokens, yes_no_max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("answers: temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")
        if self.limit < 0 or self.num_images < 0:
            raise ConfigError("answers: limit and num_images must be >= 0")


@dataclass
class MMHalConfig(JudgeConfig):
    """MMHal-Bench judging (`mmhal:` section)."""

    answers: str = option("Answers file: the benchmark's question list with model_answer filled in.", "")
    out: str = option("Metrics JSON to write (reviews and judge cache go beside it).", "")
    unparseable: str = option("Replies without exactly one rating: 'skip' (left out of averages) or 'zero'.", "skip")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unparseable not in ("skip", "zero"):
            raise ConfigError(f"mmhal.unparseable: '{self.unparseable}' is not one of skip, zero")


@dataclass
class LlavaBenchConfig(JudgeConfig):
    """LLaVA-Bench judging (`llava_bench:` section)."""

    answers: str = option("Model answers JSONL (question_id, text, ...), as eval/answers.py writes it.", "")
    questions: str = option("The benchmark's questions.jsonl (question_id, image, text, category).", "")
    context: str = option("The benchmark's context.jsonl (image, caption): the text the judge sees of each image.", "")
    reference: str = option("Reference answers JSONL (answers_gpt4.jsonl: question_id, text).", "")
    out: str = option("Metrics JSON to write (reviews and judge cache go beside it).", "")


@dataclass
class ObjHalConfig(JudgeConfig):
    """Object HalBench judging (`objhal:` section): object extraction by a judge, matched to COCO."""

    answers: str = option(
        "Answers JSONL (image_id, prompt, text), as eval/answers.py --benchmark objhal writes it.", ""
    )
    questions: str = option("The benchmark's question file, for answer files without image_id (matched by line).", "")
    coco_annotations: list[str] = option(
        "COCO instances_*.json and captions_*.json files (train2014 and val2014), or the annotations folder.",
        factory=list,
    )
    synonyms: str = option("The benchmark's synonym list (RLAIF-V's eval/data/synonyms_refine.txt).", "")
    spacy_model: str = option("spaCy pipeline for tags and lemmas (published: en_core_web_trf); empty: NLTK.", "")
    nltk_data: str = option("Folder with NLTK data (punkt_tab, the tagger, WordNet), searched before $NLTK_DATA.", "")
    out: str = option("Metrics JSON to write (reviews and judge cache go beside it).", "")


@dataclass
class ReportConfig:
    """Run comparison (`report:` section)."""

    runs: list[str] = option(
        "Evaluated runs as NAME=PATH (an evaluation folder or one metrics file); the first is the baseline.",
        factory=list,
    )
    out: str = option("Folder for report.md, report.json and the PNG charts.", "")
    title: str = option("Heading of report.md.", "Evaluation report")
