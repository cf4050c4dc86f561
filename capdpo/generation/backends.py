"""Generation backends: what stages 2-4 call to generate and score, registered in `BACKENDS`.

A backend answers three calls, on `Request`s (`capdpo.generation.batching`):

* `plan(requests, batch_size)`: the requests grouped into batches, in an order fixed by the requests alone;
* `generate(batch, gen)`: one `Output` per request, sampled reproducibly per request (`Generation` settings);
* `score(requests, batch_size)`: {request key: next-token log-probabilities at the prompt's end and after each
  continuation token}, from forward passes only.

`local` (`capdpo.generation.engine.Engine`) runs the model in this process. To add a backend (e.g. an HTTP
client of a serving engine): a class with these three methods, a factory `(common, role, **options) -> backend`
registered below, and a test in tests/generation/ that checks its outputs against the local backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from capdpo.generation.batching import Output, Request
from capdpo.generation.sampling import Generation


class Backend(Protocol):
    def plan(self, requests: Sequence[Request], batch_size: int) -> list[list[Request]]: ...

    def generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]: ...

    def score(self, requests: Sequence[Request], batch_size: int) -> dict[str, Any]: ...


def local(common: Any, role: str, **options: Any) -> Backend:
    """The run's `strong` or `weak` model loaded in this process (`options`: the Engine's, e.g. prefill_rows)."""
    from capdpo.generation.engine import Engine
    from capdpo.models.loading import load_role

    return Engine(load_role(common, role), **options)


BACKENDS: dict[str, Callable[..., Backend]] = {"local": local}


def open_backend(name: str, common: Any, role: str, **options: Any) -> Backend:
    """The backend `name` serving the run's `role` model."""
    return BACKENDS[name](common, role, **options)
