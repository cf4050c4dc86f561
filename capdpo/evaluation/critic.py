"""The built-in caption critic: a VLM judge that scores each caption 0-100 against its image and reference captions.

    python eval/chair.py --captions EVAL_DIR/answers/coco.json --coco_instances ... --coco_captions ... \
        --coco_images COCO/val2014 --critic vlm --critic_model CRITIC_MODEL_DIR --out EVAL_DIR/chair.json

`vlm_critic` has the `CaptionCritic` signature of `capdpo.evaluation.caption_metrics`, so `--critic vlm` (or
`llava-critic`, or `capdpo.evaluation.critic:vlm_critic`) plugs it into `eval/chair.py`; its options
(`CriticOptions`) come from `--critic_config` and the `--critic_model` / `--critic_url` / `--critic_cache` flags.

- Prompt: `eval/prompts/critic_pointwise.txt` (a `JudgePrompt` file), in the pointwise format LLaVA-Critic was trained
  on (arXiv 2410.02712): the image, the question (the caption prompt), the reference captions and the caption as "the
  LMM response", to be scored out of 100 with reasons.
- Backends, both through `capdpo.generation` with the image in the request, greedy: a local VLM loaded by
  `capdpo.models.loading.load_vlm` (default `lmms-lab/llava-critic-7b`), or an OpenAI-compatible endpoint
  (`critic_url`, `critic_model`; the image sent as a base64 data URL; the API key read from the environment variable
  named by `api_key_env`, sent only as a Bearer token, never printed or written). The hub repo
  `lmms-lab/llava-critic-7b` is in the original LLaVA-NeXT format, which transformers cannot load: give `model` a
  conversion to the transformers LLaVA-OneVision format, or serve the model with SGLang (or vLLM, from such a
  conversion) and use `critic_url`.
- Reply: the last "N/100", "N out of 100" or "Score: N" / "Overall score: N" in it (`parse_score`); a reply without
  one, or with a number outside [0, 100] there, is unreadable (None, counted as `Critic_unparsed`).
- Cache: every reply is appended to `cache` (JSONL) the moment it arrives, keyed by (critic identity, prompt hash,
  image sha256) through `capdpo.evaluation.judge.judge_items`: a rerun asks only what is not cached, and a crash
  loses no finished reply.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.config import CommonConfig, build, option, require, require_choice
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.caption_metrics import CriticRequest
from capdpo.evaluation.judge import PROMPTS_DIR, JudgeItem, JudgePrompt, in_flight, judge_items

DEFAULT_MODEL = "lmms-lab/llava-critic-7b"
DEFAULT_QUESTION = "Please describe this image in detail."
DEFAULT_PROMPT = PROMPTS_DIR / "critic_pointwise.txt"
PLACEHOLDERS = ("question", "references", "response")


@dataclass
class CriticOptions:
    """Options of the built-in critic (`vlm_critic(requests, **options)`; `--critic_config` in eval/chair.py)."""

    model: str = option(
        "Local critic VLM: a folder or hub id loaded by capdpo's model loader (used when critic_url is empty). "
        "lmms-lab/llava-critic-7b itself is in the LLaVA-NeXT format: convert it, or serve it and use critic_url.",
        DEFAULT_MODEL,
    )
    critic_url: str = option(
        "Base URL of an OpenAI-compatible endpoint serving the critic, e.g. http://127.0.0.1:30000/v1 (requests go "
        "to <url>/chat/completions). Empty: the local model.",
        "",
    )
    critic_model: str = option("Model name sent to the endpoint (default: model).", "")
    api_key_env: str = option(
        "Environment variable holding the endpoint's API key (sent as a Bearer token; never printed or written). "
        "Empty or unset: no key.",
        "",
    )
    cache: str = option("Reply cache (JSONL): every reply is appended as it arrives; a rerun asks only the rest.", "")
    question: str = option("The question the captions answer (the caption prompt).", DEFAULT_QUESTION)
    prompt: str = option("Prompt file (default: eval/prompts/critic_pointwise.txt).", "")
    max_new_tokens: int = option("Token limit of one reply (greedy decoding).", 512)
    batch_size: int = option("Local model: captions per generate call (halves on CUDA out-of-memory).", 8)
    workers: int = option("Endpoint: requests in flight at once.", 8)
    timeout: float = option("Endpoint: seconds to wait for one reply before retrying it.", 300.0)
    max_retries: int = option("Endpoint: retries of a request on HTTP 429/5xx, timeouts and lost connections.", 6)
    image_transport: str = option(
        "Endpoint: 'data_url' (the image's bytes, base64) or 'file_url' (file://path, for a server on this machine "
        "that may read local files).",
        "data_url",
    )
    device: str = option("Local model: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.", "auto")
    dtype: str = option("Local model: 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16' or 'float32'.", "auto")
    attn_implementation: str = option("Local model: 'auto', 'sdpa', 'eager' or 'flash_attention_2'.", "auto")
    min_pixels: int = option("Local model: smallest image area for Qwen processors (0: the processor's).", 0)
    max_pixels: int = option("Local model: largest image area for Qwen processors (0: the processor's).", 0)
    trust_remote_code: bool = option("Local model: allow the model repo to run its own code.", False)

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "model", "name the critic model (a folder or hub id)")
        if self.critic_url:
            require(
                self.critic_url.startswith(("http://", "https://")),
                "critic_url",
                f"'{self.critic_url}' must start with http:// or https://",
            )
        else:
            require(not self.critic_model, "critic_model", "names a served model: give critic_url too (or use model)")
        require(bool(self.question.strip()), "question", "must not be empty")
        for name in ("max_new_tokens", "batch_size", "workers"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.max_retries >= 0, "max_retries", "must be >= 0")
        require(self.timeout > 0, "timeout", "must be > 0")
        require_choice("image_transport", self.image_transport, ("data_url", "file_url"))
        require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            f"'{self.device}' is not one of auto, cpu, cuda, cuda:N",
        )

    def common(self) -> CommonConfig:
        """The loader settings of the local model (`CommonConfig` checks dtype, attention and pixel limits)."""
        return CommonConfig(
            device=self.device,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            trust_remote_code=self.trust_remote_code,
        )


def critic_options(options: dict[str, Any], where: str = "critic") -> CriticOptions:
    """Checked options: an unknown key, a wrong type or a bad value is a one-line `ConfigError` naming it."""
    opts = build(CriticOptions, options, where)
    try:
        opts.common()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return opts


# ---- reply parsing ----------------------------------------------------------------------------------------------
_NUMBER = r"(?<![\w.])(-?\d+(?:\.\d+)?)(?!\.?\d)"  # a whole number: never "8" out of "85" or "72" out of "72.5"
_OF_100 = r"100(?![.,]?\d)"
_SCORE_FORMS = (
    re.compile(_NUMBER + r"\s*/\s*" + _OF_100),  # 72/100
    re.compile(_NUMBER + r"\s+out\s+of\s+" + _OF_100, re.IGNORECASE),  # 72 out of 100
    # Score: 72, Overall score: 72 (markdown bold around the label allowed); not "Score: 8/10"
    re.compile(r"\bscore\**\s*[:：]\s*\**\s*" + _NUMBER + r"(?!\s*/\s*(?!" + _OF_100 + r"))", re.IGNORECASE),
)


def parse_score(reply: str) -> float | None:
    """The last score in a critic's reply ("N/100", "N out of 100", "Score: N", "Overall score: N"; N an integer
    or a decimal), or None when there is none or that last one lies outside [0, 100]."""
    found = [(m.start(1), m.group(1)) for form in _SCORE_FORMS for m in form.finditer(reply)]
    if not found:
        return None
    value = float(max(found)[1])
    return value if 0 <= value <= 100 else None


# ---- the critic -------------------------------------------------------------------------------------------------
def critic_items(requests: Sequence[CriticRequest], prompt: JudgePrompt, question: str) -> list[JudgeItem]:
    """One judge item per caption: the prompt filled with the question, references and caption, and the image.

    Raises:
        ConfigError: a caption has no image path (the images folder was not given, or the annotations name no file).
        InputError: an image file is missing.
    """
    items = []
    for number, request in enumerate(requests, start=1):
        if not request.image:
            raise ConfigError(
                f"critic: the caption of image {request.image_id} has no image file; the built-in critic looks at the "
                "images (eval/chair.py: pass --coco_images FOLDER, with annotation files that list file names)"
            )
        if not Path(request.image).is_file():
            raise InputError(f"{request.image}: image of image id {request.image_id} not found (check --coco_images)")
        references = "\n".join(f"- {ref.strip()}" for ref in request.references) or "(none)"
        messages = prompt.render(question=question, references=references, response=request.caption)
        items.append(JudgeItem(question_id=f"{request.image_id}#{number}", messages=messages, image=request.image))
    return items


class VlmCritic:
    """A VLM asked judge items with their image, through a generation backend: the local engine (`load_vlm`) or an
    OpenAI-compatible server (`capdpo.generation.server`). Has what `judge_items` needs of a judge."""

    def __init__(self, opts: CriticOptions) -> None:
        self.opts = opts
        self.remote = bool(opts.critic_url)
        self.name = (opts.critic_model or opts.model) if self.remote else opts.model
        self._backend: Any = None

    @property
    def identity(self) -> dict[str, Any]:
        """What determines a reply besides the prompt and the image (the cache key's other part)."""
        identity: dict[str, Any] = {
            "critic": "endpoint" if self.remote else "local",
            "model": self.name,
            "temperature": 0.0,
            "max_tokens": self.opts.max_new_tokens,
        }
        if not self.remote and (self.opts.min_pixels or self.opts.max_pixels):
            identity["pixels"] = [self.opts.min_pixels, self.opts.max_pixels]
        return identity

    def describe(self) -> dict[str, Any]:
        where = {"url": self.opts.critic_url, "api_key_env": self.opts.api_key_env} if self.remote else {}
        return {**where, **self.identity}

    @property
    def backend(self) -> Any:
        """The generation backend, opened on first use (a fully cached rerun never loads a model)."""
        if self._backend is None:
            from capdpo.generation.backends import BACKENDS
            from capdpo.generation.config import BackendConfig

            opts = self.opts
            if self.remote:
                section = BackendConfig(
                    backend="openai",
                    base_url=opts.critic_url.rstrip("/").removesuffix("/chat/completions"),
                    server_model=self.name,
                    server_key_env=opts.api_key_env,
                    max_concurrency=opts.workers,
                    request_timeout=opts.timeout,
                    max_retries=opts.max_retries,
                    image_transport=opts.image_transport,
                )
                self._backend = BACKENDS["openai"](opts.common(), "critic", section, model=self.name)
            else:
                self._backend = BACKENDS["local"](opts.common(), "critic", model=self.name)
        return self._backend

    def complete_many(self, items: Sequence[JudgeItem]) -> Iterator[tuple[str, str]]:
        """(item id, reply) as replies arrive: per batch from the local model, per request from an endpoint."""
        from capdpo.generation.batching import Request, user_message
        from capdpo.generation.sampling import Generation

        if not items:
            return
        gen = Generation(max_new_tokens=self.opts.max_new_tokens, temperature=0.0)
        requests = []
        for item in items:
            # the prompt's system message stays text; the image goes first in the user turn, as answers are asked
            *head, user = item.messages
            messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in head]
            requests.append(
                Request(key=item.question_id, image=item.image, messages=[*messages, user_message(user["content"])])
            )
        backend = self.backend
        if not self.remote:
            for batch in backend.plan(requests, self.opts.batch_size):
                for output in backend.generate(batch, gen):
                    yield output.key, output.text
            return

        calls = [(r.key, lambda r=r: backend.generate([r], gen)) for r in requests]
        for key, (output,) in in_flight(calls, self.opts.workers):
            yield key, output.text


def vlm_critic(requests: list[CriticRequest], **options: Any) -> list[float | None]:
    """Score each caption 0-100 with a VLM judge (see the module docstring); None where the reply is unreadable.

    Options: the fields of `CriticOptions`; `cache` is required.
    """
    opts = critic_options(options)
    if not opts.cache:
        raise ConfigError(
            "critic: 'cache' is required: a JSONL file that keeps every reply (eval/chair.py: --critic_cache FILE, "
            "or --out, which puts it beside)"
        )
    prompt = JudgePrompt.load(opts.prompt or DEFAULT_PROMPT, PLACEHOLDERS)
    items = critic_items(requests, prompt, opts.question)
    critic = VlmCritic(opts)
    result = judge_items(items, critic, opts.cache)
    scores = [parse_score(result.replies[item.question_id]) for item in items]
    unreadable = sum(score is None for score in scores)
    print(
        f"critic {critic.name}: {len(items)} captions ({result.cached} cached, {result.requested} asked), "
        f"{unreadable} unreadable replies; cache {opts.cache}",
        file=sys.stderr,
    )
    return scores
