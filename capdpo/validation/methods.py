"""Validation methods: how the weak model scores a sentence's candidates against the image, registered in
`METHODS` (`validate.methods` names them).

Every method reads next-token probabilities from single forward passes (no sampling), so scores are
deterministic. A method is a class built from the weak model and the `validate` config, with a `name`, and two
calls: `jobs(key, image, candidates)` turns one sentence's candidates into requests, and
`scores(candidates, results)` turns those requests' log-probabilities back into one score in [0, 1] per candidate
(1 = accurate) with the raw numbers in `details`. A method may also list the vocabulary ids its `scores` reads as
`reads`: a local model then moves only those log-probabilities off the GPU (without it, whole rows). To add a
method: write the class here, register it in `METHODS`, give `ValidateConfig` its prompt if it has one, and test it
in tests/validation/ against plain forward passes on the tiny models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations
from typing import TYPE_CHECKING, Any

from capdpo.errors import ConfigError, InputError
from capdpo.generation.batching import Request, user_message

if TYPE_CHECKING:
    from capdpo.models.loading import LoadedModel
    from capdpo.validation.config import ValidateConfig


@dataclass
class AnswerTokens:
    """The first token of a one-word answer ("yes", "A"), as token ids of the local tokenizer and as words.

    A local backend's row is a log-probability tensor over the vocabulary (read at `ids`); a server's row is its
    top log-probabilities by token text (`capdpo.generation.server.TopLogprobs`, read by word).
    """

    words: tuple[str, ...]
    ids: list[int]

    def mass(self, row: Any) -> float:
        """The probability of this answer in one row of log-probabilities."""
        if isinstance(row, dict):
            return sum(math.exp(lp) for token, lp in row.items() if token.strip() in self.words)
        return _mass(row, self.ids)


def answer_tokens(lm: LoadedModel | None, words: list[str]) -> AnswerTokens:
    """`AnswerTokens` of `words` (without a local model, for a server's replies: the words only)."""
    return AnswerTokens(tuple(words), answer_token_ids(lm, words) if lm is not None else [])


def two_way(first: AnswerTokens, second: AnswerTokens, row: Any, what: str) -> tuple[float, float, float]:
    """(P(first) / (P(first) + P(second)), P(first), P(second)) of one row. A server's reply with neither answer
    among its top tokens is an error, never a silent 0.5."""
    p1, p2 = first.mass(row), second.mass(row)
    if p1 + p2 > 0:
        return p1 / (p1 + p2), p1, p2
    if isinstance(row, dict):
        raise InputError(
            f"validate: the server's top tokens for a {what} question hold neither {first.words[0]!r} nor "
            f"{second.words[0]!r} ({', '.join(list(row)[:8])}); use a chat template that answers with one word, or "
            "backend: local"
        )
    return 0.5, p1, p2


def answer_token_ids(lm: LoadedModel, words: list[str]) -> list[int]:
    """Single-token ids of `words` as the first token of an answer (with and without a leading space)."""
    tok = lm.tokenizer
    ids: list[int] = []
    for word in words:
        for form in (word, " " + word):
            encoded = tok.encode(form, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
    if not ids:
        raise ConfigError(f"validate: the weak model's tokenizer has no single token for any of {words}")
    return ids


def _mass(logprobs_row: Any, ids: list[int]) -> float:
    return float(logprobs_row[ids].exp().sum())


@dataclass
class Job:
    """A request and where its result goes: (method, candidate or pair, extra)."""

    request: Request
    method: str
    target: Any


class YesNo:
    """P(yes) / (P(yes) + P(no)) for "is this sentence accurate for the image?"."""

    name = "yesno"

    def __init__(self, lm: LoadedModel | None, cfg: ValidateConfig) -> None:
        self.prompt = cfg.yesno_prompt
        self.yes = answer_tokens(lm, ["Yes", "yes", "YES"])
        self.no = answer_tokens(lm, ["No", "no", "NO"])
        if set(self.yes.ids) & set(self.no.ids):
            raise ConfigError("validate: yes and no share a token in the weak model's tokenizer")
        self.reads = self.yes.ids + self.no.ids

    def jobs(self, key: str, image: str, candidates: list[str]) -> list[Job]:
        return [
            Job(
                Request(
                    key=f"{key}:yesno:{i}", image=image, messages=[user_message(self.prompt.replace("{sentence}", c))]
                ),
                self.name,
                i,
            )
            for i, c in enumerate(candidates)
        ]

    def scores(self, candidates: list[str], results: dict[Any, Any]) -> list[dict[str, Any]]:
        out = []
        for i in range(len(candidates)):
            score, p_yes, p_no = two_way(self.yes, self.no, results[i][0], "yes/no")
            out.append({"score": score, "p_yes": p_yes, "p_no": p_no})
        return out


class Rating:
    """Expected value of a 0–100 rating, read from the probabilities of the number's tokens.

    The numbers 0..100 form a trie of token paths. P(n) is the product of the conditional probabilities along
    n's path times the probability of stopping there (1 − the mass on further number tokens, or 1 where no
    valid number continues the path). Each internal node of the trie needs one distribution; teacher-forcing
    the longest internal paths gets them all in a few forward passes (9 for Qwen's single-digit numbers).
    """

    name = "rating"

    def __init__(self, lm: LoadedModel | None, cfg: ValidateConfig) -> None:
        if lm is None:
            raise ConfigError(
                "validate.methods: rating reads each number's probability token by token, which needs the model "
                "in this process (backend: local); through a server use yesno or pairwise"
            )
        self.prompt = cfg.rating_prompt
        tok = lm.tokenizer
        probe = lm.processor.apply_chat_template(
            [user_message("x", with_image=False)], tokenize=False, add_generation_prompt=True
        )
        lead = "" if probe[-1:].isspace() else " "  # "assistant\n" vs "ASSISTANT:" (answer after a space)
        self.paths = {n: tuple(tok.encode(lead + str(n), add_special_tokens=False)) for n in range(101)}
        self.number_tokens = sorted({t for path in self.paths.values() for t in path})
        self.reads = self.number_tokens
        internal = {path[:j] for path in self.paths.values() for j in range(len(path))}
        self.internal = internal
        # teacher-forced sequences: internal nodes that no other internal node extends
        self.sequences = sorted(p for p in internal if not any(q != p and q[: len(p)] == p for q in internal))

    def jobs(self, key: str, image: str, candidates: list[str]) -> list[Job]:
        jobs = []
        for i, c in enumerate(candidates):
            messages = [user_message(self.prompt.replace("{sentence}", c))]
            for s, seq in enumerate(self.sequences):
                jobs.append(
                    Job(
                        Request(key=f"{key}:rating:{i}:{s}", image=image, messages=messages, continuation=list(seq)),
                        self.name,
                        (i, seq),
                    )
                )
        return jobs

    def scores(self, candidates: list[str], results: dict[Any, Any]) -> list[dict[str, Any]]:
        out = []
        for i in range(len(candidates)):
            dist: dict[tuple[int, ...], Any] = {}
            for seq in self.sequences:
                rows = results[(i, seq)]
                for j in range(len(seq) + 1):
                    dist.setdefault(seq[:j], rows[j])
            weights = {}
            for value, path in self.paths.items():
                logp = 0.0
                for j, token in enumerate(path):
                    logp += float(dist[path[:j]][token])
                p = math.exp(logp)
                if path in self.internal:  # a longer number could follow: only the stopping mass counts
                    p *= max(0.0, 1.0 - _mass(dist[path], self.number_tokens))
                weights[value] = p
            total = sum(weights.values())
            expected = sum(v * p for v, p in weights.items()) / total if total > 0 else 50.0
            out.append({"score": expected / 100.0, "expected": expected, "number_mass": total})
        return out


class Pairwise:
    """Which of two candidates is more accurate, asked in both orders; only consistent verdicts count.

    A candidate's score is the mean over its comparisons of 1 (won in both orders), 0 (lost in both) or 0.5
    (the orders disagree: position bias, not evidence).
    """

    name = "pairwise"

    def __init__(self, lm: LoadedModel | None, cfg: ValidateConfig) -> None:
        self.prompt = cfg.pairwise_prompt
        self.a = answer_tokens(lm, ["A"])
        self.b = answer_tokens(lm, ["B"])
        self.reads = self.a.ids + self.b.ids

    def jobs(self, key: str, image: str, candidates: list[str]) -> list[Job]:
        jobs = []
        for i, j in permutations(range(len(candidates)), 2):
            text = self.prompt.replace("{a}", candidates[i]).replace("{b}", candidates[j])
            jobs.append(
                Job(
                    Request(key=f"{key}:pairwise:{i}:{j}", image=image, messages=[user_message(text)]),
                    self.name,
                    (i, j),
                )
            )
        return jobs

    def scores(self, candidates: list[str], results: dict[Any, Any]) -> list[dict[str, Any]]:
        n = len(candidates)
        p_first = {}  # P(the candidate shown as A is better), per ordered pair
        for (i, j), rows in results.items():
            p_first[(i, j)] = two_way(self.a, self.b, rows[0], "pairwise")[0]
        out = []
        for i in range(n):
            wins = losses = inconsistent = 0
            for j in range(n):
                if i == j:
                    continue
                first = p_first[(i, j)] > 0.5  # i shown first and preferred
                second = p_first[(j, i)] < 0.5  # i shown second and preferred
                if first and second:
                    wins += 1
                elif not first and not second:
                    losses += 1
                else:
                    inconsistent += 1
            compared = n - 1
            score = (wins + 0.5 * inconsistent) / compared if compared else 0.5
            out.append({"score": score, "wins": wins, "losses": losses, "inconsistent": inconsistent})
        return out


class Claims:
    """Claim-level verification: each candidate's atomic claims (`capdpo.validation.claims`), each asked as a yes/no
    question; the candidate's score combines the claims' P(yes) / (P(yes) + P(no)).

    `claims_combine`: `min` (the least credible claim), `mean`, or `false_count`: 1 / (1 + the number of claims
    judged false, P(yes) share < `claims_threshold`), RLAIF-V's count of rejected claims mapped into [0, 1].
    The stage fills `decompositions` (sentence -> claims) before asking for jobs.
    """

    name = "claims"

    def __init__(self, lm: LoadedModel | None, cfg: ValidateConfig) -> None:
        self.prompt = cfg.claims_prompt
        self.combine = cfg.claims_combine
        self.threshold = cfg.claims_threshold
        self.yes = answer_tokens(lm, ["Yes", "yes", "YES"])
        self.no = answer_tokens(lm, ["No", "no", "NO"])
        self.reads = self.yes.ids + self.no.ids
        self.decompositions: dict[str, list[dict[str, str]]] = {}

    def claims_of(self, candidate: str) -> list[dict[str, str]]:
        if candidate not in self.decompositions:
            raise InputError(f"validate: no claims for {candidate!r} (the stage decomposes candidates first)")
        return self.decompositions[candidate]

    def jobs(self, key: str, image: str, candidates: list[str]) -> list[Job]:
        jobs = []
        for i, candidate in enumerate(candidates):
            for c, claim in enumerate(self.claims_of(candidate)):
                text = self.prompt.replace("{question}", claim["question"])
                jobs.append(
                    Job(
                        Request(key=f"{key}:claims:{i}:{c}", image=image, messages=[user_message(text)]),
                        self.name,
                        (i, c),
                    )
                )
        return jobs

    def scores(self, candidates: list[str], results: dict[Any, Any]) -> list[dict[str, Any]]:
        out = []
        for i, candidate in enumerate(candidates):
            claims = []
            for c, claim in enumerate(self.claims_of(candidate)):
                score, p_yes, p_no = two_way(self.yes, self.no, results[(i, c)][0], "claims")
                claims.append({**claim, "score": score, "p_yes": p_yes, "p_no": p_no})
            out.append(
                {**combine_claims([c["score"] for c in claims], self.combine, self.threshold), "claims": claims}
            )
        return out


def combine_claims(scores: list[float], how: str, threshold: float = 0.5) -> dict[str, Any]:
    """A candidate's score from its claims' scores: `min`, `mean` or `false_count` (1 / (1 + claims below
    `threshold`)); also the number judged false."""
    false = sum(s < threshold for s in scores)
    if not scores:
        return {"score": 0.5, "false_claims": 0}
    if how == "min":
        score = min(scores)
    elif how == "mean":
        score = sum(scores) / len(scores)
    else:
        score = 1.0 / (1.0 + false)
    return {"score": score, "false_claims": false}


METHODS: dict[str, type] = {"yesno": YesNo, "rating": Rating, "pairwise": Pairwise, "claims": Claims}
