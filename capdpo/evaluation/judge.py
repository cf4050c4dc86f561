"""LLM-as-judge for MMHal-Bench and LLaVA-Bench: prompt files, an HTTP or local judge, and a reply cache.

A judge is either any OpenAI-compatible chat-completions endpoint (`--judge_url`, `--judge_model`, the API key
read from the environment variable named by `--api_key_env`) or a local HF model (`--judge_local`, greedy).
Every reply is appended to a cache file the moment it arrives, keyed by (judge identity, prompt hash): a rerun,
or a run resumed after a crash or a rate-limit give-up, asks the judge only what it has not answered yet.

Prompt files (`eval/prompts/*.txt`) start with header lines beginning `#|` that document the placeholders; a
header line `#| system: ...` sets the system message. Everything after the header is the user message, in which
`{name}` placeholders are filled in (`{{` and `}}` stand for literal braces).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.config import JudgeConfig

PROMPTS_DIR = Path(__file__).resolve().parent.parent.parent / "eval" / "prompts"
_RETRYABLE_STATUS = {408, 409, 425, 429}  # plus every 5xx
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")  # {{ and }} are literal braces


# ---- prompts ----------------------------------------------------------------------------------------------
@dataclass
class JudgePrompt:
    """A judge prompt read from a file: optional system message and a user template with `{name}` slots."""

    path: Path
    system: str
    template: str

    @classmethod
    def load(cls, path: str | Path, placeholders: Sequence[str]) -> JudgePrompt:
        """Read a prompt file; every name in `placeholders` must appear, and no other `{name}` may.

        Raises:
            ConfigError: the file is missing, empty, or its placeholders do not match.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"prompt: {path} not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        system = ""
        body_start = 0
        for number, line in enumerate(lines):
            if not line.startswith("#|"):
                break
            body_start = number + 1
            directive = line[2:].strip()
            if directive.lower().startswith("system:"):
                system = directive.split(":", 1)[1].strip()
        template = "\n".join(lines[body_start:]).strip("\n")
        if not template.strip():
            raise ConfigError(f"prompt: {path} has no prompt text after its '#|' header")
        used = {name for name in _PLACEHOLDER.findall(template) if name}
        unknown = sorted(used - set(placeholders))
        missing = [p for p in placeholders if p not in used]
        if unknown:
            raise ConfigError(
                f"prompt: {path} uses unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"known: {', '.join('{' + p + '}' for p in placeholders)}"
            )
        if missing:
            raise ConfigError(f"prompt: {path} lacks placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
        return cls(path=path, system=system, template=template)

    def render(self, **values: str) -> list[dict[str, str]]:
        """Chat messages with the placeholders filled (values are inserted verbatim, braces and all)."""

        def fill(match: re.Match[str]) -> str:
            return str(values[match.group(1)]) if match.group(1) else match.group(0)[0]

        text = _PLACEHOLDER.sub(fill, self.template)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return [*messages, {"role": "user", "content": text}]

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.system, self.template]).encode("utf-8")).hexdigest()


@dataclass
class PublishedPrompt:
    """A benchmark's own prompt file, kept byte for byte (no header, no stripping): the published protocols fill
    it exactly as the benchmark's script does."""

    path: Path
    text: str

    @classmethod
    def load(cls, path: str | Path) -> PublishedPrompt:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"prompt: {path} not found")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"prompt: {path} is empty")
        return cls(path, text)

    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def default_prompt(name: str) -> Path:
    return PROMPTS_DIR / f"{name}_judge.txt"


# ---- judges -----------------------------------------------------------------------------------------------
@dataclass
class JudgeItem:
    """One question to judge: its id (as in the answers file), the chat messages and, for a judge that looks at
    images, the image file shown with them (its content hash joins the cache key)."""

    question_id: str
    messages: list[dict[str, str]]
    image: str | None = None


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint (`capdpo.api`: retries, no cross-host redirects, key kept)."""

    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        from capdpo.api import ApiClient, ApiSettings

        if not cfg.judge_model:
            raise ConfigError("judge_model: name the model the endpoint should use (e.g. --judge_model gpt-4-0613)")
        base = cfg.judge_url.rstrip("/")
        self.path = "chat/completions"
        if base.endswith("/chat/completions"):
            base = base.removesuffix("/chat/completions")
        self.model = cfg.judge_model
        self.cfg = cfg
        settings = ApiSettings(base, cfg.api_key_env, cfg.timeout, cfg.max_retries, cfg.backoff, "judge endpoint")
        self.client = ApiClient(settings, sleep=sleep)
        self.endpoint = self.client.url(self.path)
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            print(f"note: ${cfg.api_key_env} is not set; calling {self.endpoint} without an API key", file=sys.stderr)

    @property
    def identity(self) -> dict[str, Any]:
        """What determines a reply besides the prompt (the cache key's other half)."""
        return {
            "model": self.model,
            "temperature": self.cfg.judge_temperature,
            "max_tokens": self.cfg.judge_max_tokens,
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": "http", "url": self.endpoint, "api_key_env": self.cfg.api_key_env, **self.identity}

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion; retries 429/5xx, timeouts and dropped connections, fails fast on other errors."""
        from capdpo.api import chat_text

        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.cfg.judge_temperature}
        if self.cfg.judge_max_tokens > 0:  # 0: no limit sent (MMHal-Bench's published request has none)
            body["max_tokens"] = self.cfg.judge_max_tokens
        return self.client.post(self.path, body, chat_text)

    def complete_many(self, items: Sequence[JudgeItem]) -> Iterator[tuple[str, str]]:
        """(question id, reply) as each request finishes, `workers` requests in flight."""
        calls = [(item.question_id, lambda item=item: self.complete(item.messages)) for item in items]
        yield from in_flight(calls, self.cfg.workers)


def in_flight(calls: Sequence[tuple[str, Callable[[], Any]]], workers: int) -> Iterator[tuple[str, Any]]:
    """(key, result) of each call as it finishes, `workers` calls at a time. Every result that has arrived is handed
    on (in the calls' order) before the first failure is raised, so a caller that caches results loses none of
    them; the calls not started yet are cancelled."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = {pool.submit(call): (n, key) for n, (key, call) in enumerate(calls)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            failed = None
            for future in sorted(done, key=lambda f: pending[f][0]):
                _, key = pending.pop(future)
                if future.exception() is not None:
                    failed = failed or future
                    continue
                yield key, future.result()
            if failed is not None:
                failed.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class LocalJudge:
    """A local model loaded with `capdpo.models.load_vlm`, asked text-only prompts in batches."""

    def __init__(self, cfg: JudgeConfig, common: Any) -> None:
        self.cfg = cfg
        self.common = common
        self.name = cfg.judge_local
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        """The loaded model, loaded on first use (a fully cached rerun never loads it)."""
        if self._engine is None:
            from capdpo.generation.engine import Engine
            from capdpo.models.loading import load_vlm

            common = self.common
            lm = load_vlm(
                self.name,
                device=common.device,
                dtype=common.dtype,
                attn_implementation=common.attn_implementation,
                trust_remote_code=common.trust_remote_code,
                field="judge_local",
            )
            # Judge prompts are text only; the static-cache decoder currently expects image position deltas
            # (Qwen M-RoPE) that a text-only batch does not produce, so the plain `generate` path is used.
            self._engine = Engine(lm, decoder="hf")
        return self._engine

    @property
    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "temperature": self.cfg.judge_temperature, "max_tokens": self.cfg.judge_max_tokens}

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", **self.identity}

    def complete_many(self, items: Sequence[JudgeItem]) -> Iterator[tuple[str, str]]:
        from capdpo.generation.batching import Request
        from capdpo.generation.sampling import Generation, seed_of

        if not items:
            return
        gen = Generation(
            max_new_tokens=self.cfg.judge_max_tokens if self.cfg.judge_max_tokens > 0 else 1024,
            temperature=self.cfg.judge_temperature,
        )
        requests = [
            Request(
                key=item.question_id,
                image=None,
                messages=_text_messages(item.messages),
                seed=seed_of("judge", item.question_id),
            )
            for item in items
        ]
        for batch in self.engine.plan(requests, self.cfg.judge_batch_size):
            for output in self.engine.generate(batch, gen):
                yield output.key, output.text


def _text_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Plain-string chat messages as the content-part lists processors' chat templates expect."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def make_judge(cfg: JudgeConfig, common: Any) -> HttpJudge | LocalJudge:
    """The judge the config names; one of `judge_url` / `judge_local` is required."""
    if cfg.judge_url:
        return HttpJudge(cfg)
    if cfg.judge_local:
        return LocalJudge(cfg, common)
    raise ConfigError("judge: give --judge_url URL --judge_model NAME (OpenAI-compatible API) or --judge_local MODEL")


# ---- cache and the judging loop ---------------------------------------------------------------------------
def cache_key(identity: dict[str, Any], messages: list[dict[str, str]], image_sha256: str = "") -> tuple[str, str]:
    """(cache id, prompt sha256): the id hashes the judge identity with the exact prompt (and the image's sha256
    when the judge sees one)."""
    from capdpo.jsonl import stable_id

    prompt_sha = hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
    if image_sha256:
        return stable_id("judge", identity, prompt_sha, image_sha256), prompt_sha
    return stable_id("judge", identity, prompt_sha), prompt_sha


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (an image shown to a judge)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise InputError(f"{path}: cannot read the image ({err.strerror or err})") from None
    return digest.hexdigest()


@dataclass
class JudgeRun:
    """Replies by question id, and where they came from."""

    replies: dict[str, str]
    cached: int
    requested: int


def judge_items(items: Sequence[JudgeItem], judge: Any, cache_path: str | Path) -> JudgeRun:
    """Ask `judge` every item not yet in the cache; append each reply to the cache as it arrives.

    The cache is keyed by (judge identity, prompt hash, image hash if any), so a changed prompt, answer, image or
    judge asks again while an unchanged one costs nothing.
    """
    from capdpo.jsonl import JsonlAppender, iter_jsonl

    cache_path = Path(cache_path)
    cached: dict[str, str] = {}
    if cache_path.exists():
        for record in iter_jsonl(cache_path, allow_torn_tail=True):
            if "id" not in record or not isinstance(record.get("reply"), str):
                raise InputError(f"{cache_path}: not a judge cache (a record lacks 'id' or 'reply')")
            cached[record["id"]] = record["reply"]
    keys, image_shas, images = {}, {}, {}
    for item in items:
        if item.image and item.image not in images:
            images[item.image] = file_sha256(item.image)
        image_shas[item.question_id] = images[item.image] if item.image else ""
        keys[item.question_id] = cache_key(judge.identity, item.messages, image_shas[item.question_id])
    replies = {qid: cached[key] for qid, (key, _) in keys.items() if key in cached}
    todo = [item for item in items if item.question_id not in replies]
    if todo:
        print(f"judge: {len(replies)} cached, asking {len(todo)} ({judge.describe()['model']})", file=sys.stderr)
    with JsonlAppender(cache_path) as cache:
        for qid, reply in judge.complete_many(todo):
            key, prompt_sha = keys[qid]
            record = {"id": key, "question_id": qid, "judge": judge.identity, "prompt_sha256": prompt_sha}
            if image_shas[qid]:
                record["image_sha256"] = image_shas[qid]
            cache.write([{**record, "reply": reply}])
            replies[qid] = reply
    return JudgeRun(replies=replies, cached=len(items) - len(todo), requested=len(todo))


def default_side_path(out: str | Path, suffix: str) -> Path:
    """`<out stem><suffix>` beside `out` (e.g. metrics.json -> metrics.judge_cache.jsonl)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + suffix)


def write_judged(
    cfg: Any,
    metrics: dict[str, Any],
    reviews: Any,
    judge: Any,
    prompt: JudgePrompt,
    result: JudgeRun,
    files: dict[str, str],
    summary: Callable[[dict[str, Any], str], str],
) -> dict[str, Any]:
    """A judged benchmark's outputs: `<out stem>.reviews.jsonl` (every reply, parsed), the metrics JSON with the
    judge, files, cache counts and provenance, and the printed summary."""
    from capdpo.jsonl import write_json, write_jsonl
    from capdpo.provenance import provenance

    sec = cfg.section
    reviews_path = default_side_path(sec.out, ".reviews.jsonl")
    write_jsonl(reviews_path, reviews)
    metrics["judge"] = {**judge.describe(), "prompt": str(prompt.path), "prompt_sha256": prompt.sha256()}
    metrics["files"] = {**files, "reviews": str(reviews_path)}
    metrics["cache"] = {"hits": result.cached, "requests": result.requested}
    metrics["meta"] = provenance(cfg.resolved())
    write_json(sec.out, metrics)
    print(summary(metrics, sec.answers))
    return metrics
