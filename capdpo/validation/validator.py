"""The configured validation methods of stage 4, combined into one score per candidate by weighted mean."""

from __future__ import annotations

from typing import Any

from capdpo.models.loading import LoadedModel
from capdpo.validation.config import ValidateConfig
from capdpo.validation.methods import METHODS, Job


class Validator:
    """The configured methods, combined by weighted mean."""

    def __init__(self, lm: LoadedModel | None, cfg: ValidateConfig) -> None:
        self.methods = [METHODS[name](lm, cfg) for name in cfg.methods]
        weights = cfg.weights or [1.0] * len(cfg.methods)
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def jobs(self, key: str, image: str, candidates: list[str]) -> list[Job]:
        return [job for method in self.methods for job in method.jobs(key, image, candidates)]

    def reads(self) -> list[int] | None:
        """The vocabulary ids the methods' scores read (None: whole rows, for a server's replies or a method that
        does not say)."""
        ids = [getattr(m, "reads", None) for m in self.methods]
        if any(not i for i in ids):
            return None
        return sorted({t for i in ids for t in i})

    def request_estimate(self, key: str, image: str, candidates: list[str]) -> int:
        """Requests the candidates will need, for planning work units: exact for every method but `claims` (four
        per candidate, before anything is decomposed)."""
        return sum(
            4 * len(candidates) if hasattr(m, "decompositions") else len(m.jobs(key, image, candidates))
            for m in self.methods
        )

    def combine(
        self, candidates: list[str], jobs: list[Job], results: dict[str, Any]
    ) -> list[tuple[float, dict[str, Any]]]:
        """Per candidate: (combined score, per-method details)."""
        per_method: dict[str, dict[Any, Any]] = {m.name: {} for m in self.methods}
        for job in jobs:
            per_method[job.method][job.target] = results[job.request.key]
        details: list[dict[str, Any]] = [{} for _ in candidates]
        combined = [0.0] * len(candidates)
        for method, weight in zip(self.methods, self.weights):
            for i, d in enumerate(method.scores(candidates, per_method[method.name])):
                details[i][method.name] = d
                combined[i] += weight * d["score"]
        return list(zip(combined, details))
