"""Generation backends: what stages 2-4 call to generate and score, registered in `BACKENDS`.

A backend answers three calls, on `Request`s (`capdpo.generation.batching`):

* `plan(requests, batch_size)`: the requests grouped into batches, in an order fixed by the requests alone;
* `generate(batch, gen)`: one `Output` per request, sampled reproducibly per request (`Generation` settings);
* `score(requests, batch_size, keep=None)`: {request key: next-token log-probabilities at the prompt's end and
  after each continuation token}, from forward passes only (`keep`: the vocabulary ids the caller reads, so a local
  backend need not move the rest of the vocabulary off the GPU).

`local` (`capdpo.generation.engine.Engine`) runs the model in this process; `openai`
(`capdpo.generation.server.ServerBackend`) sends the same requests to an OpenAI-compatible server. To add a
backend: a class with these three methods, a factory `(common, role, section, **options) -> backend` registered
below, and a test in tests/generation/ that checks its outputs against the local backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from capdpo.generation.batching import Output, Request
from capdpo.generation.sampling import Generation


class Backend(Protocol):
    def plan(self, requests: Sequence[Request], batch_size: int) -> list[list[Request]]: ...

    def generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]: ...

    def score(
        self, requests: Sequence[Request], batch_size: int, keep: Sequence[int] | None = None
    ) -> dict[str, Any]: ...


def local(common: Any, role: str, section: Any = None, model: str = "", adapter: str = "", **options: Any) -> Backend:
    """The run's `strong` or `weak` model (or `model` + `adapter`) loaded in this process (`options`: the
    Engine's, e.g. prefill_rows)."""
    from capdpo.generation.engine import Engine
    from capdpo.models.loading import load_role, load_with_run_settings

    lm = load_with_run_settings(common, model, adapter) if model else load_role(common, role)
    return Engine(lm, **options)


def openai(common: Any, role: str, section: Any = None, model: str = "", adapter: str = "", **options: Any) -> Backend:
    """The run's `strong` or `weak` model (or `model`) behind an OpenAI-compatible server (`section`: its
    `BackendConfig`; a server serves adapters under their own model names, so `adapter` is refused)."""
    from capdpo.errors import ConfigError
    from capdpo.generation.server import ServerBackend

    if adapter:
        raise ConfigError(
            "backend openai: the server serves the model; serve the adapter there (e.g. vLLM --lora-modules) and "
            "name it with server_model instead of --adapter"
        )
    return ServerBackend(section, model or (common.strong_model if role == "strong" else common.weak_model))


BACKENDS: dict[str, Callable[..., Backend]] = {"local": local, "openai": openai}


def open_backend(section: Any, common: Any, role: str, **options: Any) -> Backend:
    """The backend `section.backend` (default local) serving the run's `role` model."""
    return BACKENDS[getattr(section, "backend", "local")](common, role, section, **options)


def model_id(section: Any, common: Any, role: str) -> str:
    """How records and their ids name the model a stage uses: the configured model (with an adapter's content
    hash) for the local backend, the backend and served name for a server."""
    from capdpo.models.loading import role_model_id

    if getattr(section, "backend", "local") == "openai":
        from capdpo.generation.server import served_model_id

        return served_model_id(section, common.strong_model if role == "strong" else common.weak_model)
    return role_model_id(common, role)
