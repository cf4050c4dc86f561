"""The `openai` generation backend: stages 2-4 and eval answers through an OpenAI-compatible server.

The requests are the local backend's: the same chat messages (the image as a data URL, or a file URL for a
server that may read local files), the same sampling settings, and the request's own seed, so a rerun asks the
server for the same sample (servers that honour `seed` then answer the same). Requests run concurrently, at most
`max_concurrency` at a time, through `capdpo.api` (retries with backoff, no redirect to another host, the key
from the environment only). Scoring reads the first answer token's `top_logprobs`: what `yesno` and `pairwise`
need; methods that score a continuation token by token (`rating`) need the local backend.
"""

from __future__ import annotations

import base64
import mimetypes
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from capdpo.api import ApiClient, ApiSettings, MalformedReply
from capdpo.errors import ConfigError, InputError
from capdpo.generation.batching import Output, Request, plan_batches
from capdpo.generation.sampling import Generation


class TopLogprobs(dict):
    """The first answer token's top log-probabilities as the server gave them: token text -> log-probability."""


def served_model_id(section: Any, configured: str) -> str:
    """How records name a model reached through a server: the backend and the served name."""
    return f"openai:{section.server_model or configured}"


class ServerBackend:
    """`plan`, `generate` and `score` (first-token log-probabilities) against an OpenAI-compatible server."""

    def __init__(self, section: Any, model: str) -> None:
        self.model = section.server_model or model
        self.top_logprobs = getattr(section, "server_top_logprobs", 20)
        self.transport = section.image_transport
        self.client = ApiClient(
            ApiSettings(
                section.base_url,
                section.server_key_env,
                timeout=section.request_timeout,
                max_retries=section.max_retries,
                what="server",
            )
        )
        self.pool = ThreadPoolExecutor(max_workers=section.max_concurrency)
        self._images: dict[str, str] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.seconds = 0.0

    # ---- requests -------------------------------------------------------------------------------------------------
    def _image_url(self, path: str) -> str:
        if self.transport == "file_url":
            return Path(path).resolve().as_uri()
        with self._lock:
            if path not in self._images:
                if len(self._images) > 256:
                    self._images.clear()
                mime = mimetypes.guess_type(path)[0] or "image/png"
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                self._images[path] = f"data:{mime};base64,{data}"
            return self._images[path]

    def messages(self, request: Request) -> list[dict[str, Any]]:
        """The request's chat messages in the OpenAI format (an image part becomes an `image_url` part)."""
        out = []
        for message in request.messages:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        if request.image is None:
                            raise ConfigError("a request holds an image part but no image")
                        parts.append({"type": "image_url", "image_url": {"url": self._image_url(request.image)}})
                    else:
                        parts.append(part)
                content = parts
            out.append({"role": message["role"], "content": content})
        return out

    def _body(self, request: Request, gen: Generation) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages(request),
            "max_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "seed": request.seed,
        }
        if gen.temperature > 0 and gen.top_p < 1.0:
            body["top_p"] = gen.top_p
        if gen.temperature > 0 and gen.top_k:
            body["top_k"] = gen.top_k  # vLLM and SGLang accept these two sampling extensions
        if gen.repetition_penalty != 1.0:
            body["repetition_penalty"] = gen.repetition_penalty
        return body

    def _post(self, body: dict[str, Any], parse: Any) -> Any:
        data = self.client.post("chat/completions", body, _checked)
        with self._lock:
            self.requests += 1
            usage = data.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
        try:
            return parse(data)
        except (KeyError, IndexError, TypeError) as err:
            raise InputError(f"server {self.client.base}: a reply without the expected fields ({err!r})") from None

    # ---- the backend interface --------------------------------------------------------------------------------------
    def plan(self, requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
        """Batches of `batch_size` requests (each batch is sent `max_concurrency` requests at a time)."""
        return plan_batches(requests, batch_size)

    def generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]:
        """One `Output` per request, in the batch's order."""

        def one(request: Request) -> Output:
            def parse(data: Any) -> Output:
                choice = data["choices"][0]
                text = choice["message"]["content"] or ""
                finish = "length" if choice.get("finish_reason") == "length" else "stop"
                return Output(key=request.key, text=text.strip(), token_ids=[], finish_reason=finish)

            return self._post(self._body(request, gen), parse)

        started = time.time()
        outputs = list(self.pool.map(one, batch))
        self.seconds += time.time() - started
        return outputs

    def score(self, requests: Sequence[Request], batch_size: int, keep: Sequence[int] | None = None) -> dict[str, Any]:
        """{request key: [TopLogprobs of the first answer token]} (a list of one row, like the local backend's;
        `keep`, the local tokenizer's ids, means nothing to a server and is ignored)."""
        if any(r.continuation for r in requests):
            raise ConfigError(
                "backend openai: this validation method scores a continuation token by token, which a chat "
                "server cannot do; use backend: local for it (yesno and pairwise work through a server)"
            )
        gen = Generation(max_new_tokens=1, temperature=0.0)

        def one(request: Request) -> tuple[str, list[TopLogprobs]]:
            body = {**self._body(request, gen), "logprobs": True, "top_logprobs": self.top_logprobs}

            def parse(data: Any) -> list[TopLogprobs]:
                content = (data["choices"][0].get("logprobs") or {}).get("content") or []
                if not content or not content[0].get("top_logprobs"):
                    raise InputError(
                        f"server {self.client.base}: the reply has no top_logprobs for the answer's first token, "
                        "so yes/no probabilities cannot be read (the server must support logprobs, e.g. vLLM or "
                        "SGLang; transformers serve does not); use backend: local for validation"
                    )
                return [TopLogprobs({e["token"]: float(e["logprob"]) for e in content[0]["top_logprobs"]})]

            return request.key, self._post(body, parse)

        started = time.time()
        results = dict(self.pool.map(one, requests))
        self.seconds += time.time() - started
        return results

    def throughput(self) -> dict[str, float]:
        """Requests and tokens per second of the time spent waiting on the server (for the stage's summary)."""
        wall = max(self.seconds, 1e-9)
        return {
            "requests": self.requests,
            "requests_per_second": round(self.requests / wall, 2),
            "tokens_per_second": round((self.prompt_tokens + self.completion_tokens) / wall, 1),
            "completion_tokens": self.completion_tokens,
        }


def _checked(data: Any) -> Any:
    """A chat completion at all (`MalformedReply`, retried, when not)."""
    if not isinstance(data, dict) or not data.get("choices"):
        raise MalformedReply("not a chat completion")
    return data
