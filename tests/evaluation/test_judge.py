"""The judge: prompt files, HTTP retries and failures against a stub endpoint, the reply cache, a local judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdpo.errors import ConfigError, InputError
from capdpo.evaluation import llava_bench, mmhal
from capdpo.evaluation.config import JudgeConfig
from capdpo.evaluation.judge import HttpJudge, JudgeItem, JudgePrompt, default_prompt, judge_items
from capdpo.jsonl import read_jsonl
from tests.evaluation.stub_server import StubChatServer

DATA = Path(__file__).parent / "data"


# ---- prompt files -----------------------------------------------------------------------------------------
def test_prompt_file_header_system_and_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("#| a header line\n#| system: Be fair.\nQ: {question}\nA: {answer} {{literal}}\n")
    prompt = JudgePrompt.load(path, ["question", "answer"])
    messages = prompt.render(question="What {is} it?", answer="A cat.")
    assert messages == [
        {"role": "system", "content": "Be fair."},
        {"role": "user", "content": "Q: What {is} it?\nA: A cat. {literal}"},  # values inserted verbatim
    ]


@pytest.mark.parametrize(
    "text, error",
    [
        ("#| only a header\n", "no prompt text"),
        ("Q: {question}\n", r"lacks placeholder\(s\) \{answer\}"),
        ("Q: {question} {answr}\n", r"unknown placeholder\(s\) \{answr\}"),
    ],
)
def test_prompt_file_errors(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        JudgePrompt.load(path, ["question", "answer"])


def test_default_prompts_fit_their_benchmarks() -> None:
    mm = JudgePrompt.load(default_prompt("mmhal"), mmhal.PLACEHOLDERS)
    assert "Rating: 6" in mm.template and "Rating: 0" in mm.template
    lb = JudgePrompt.load(default_prompt("llava_bench"), llava_bench.PLACEHOLDERS)
    assert lb.system and "1 to 10" in lb.template


# ---- HTTP client ------------------------------------------------------------------------------------------
def http_judge(url: str, **overrides: object) -> HttpJudge:
    cfg = JudgeConfig(judge_url=url, judge_model="stub", api_key_env="CAPDPO_TEST_KEY", backoff=0.0, **overrides)
    return HttpJudge(cfg, sleep=lambda s: None)


def test_rate_limit_is_retried_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_TEST_KEY", "k-123")
    waits: list[float] = []
    with StubChatServer(lambda m: "ok: " + m) as server:
        judge = http_judge(server.url)
        judge.client.sleep = waits.append
        server.fail_next(429, '{"error": {"message": "rate limited"}}', {"Retry-After": "2"})
        server.fail_next(502, "<html>bad gateway</html>")
        server.fail_next(200, "this is not json")  # a malformed body is retried too
        assert judge.complete([{"role": "user", "content": "hi"}]) == "ok: hi"
    assert len(server.requests) == 4
    assert waits == [2.0, 0.0, 0.0]  # the server's Retry-After, then the (zero) backoff


def test_backoff_doubles_and_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_TEST_KEY", "k-123")
    waits: list[float] = []
    with StubChatServer(lambda m: "never") as server:
        judge = HttpJudge(
            JudgeConfig(
                judge_url=server.url, judge_model="stub", api_key_env="CAPDPO_TEST_KEY", backoff=0.5, max_retries=3
            ),
            sleep=waits.append,
        )
        for _ in range(4):
            server.fail_next(500)
        with pytest.raises(InputError, match=r"gave up after 4 tries \(last: HTTP 500"):
            judge.complete([{"role": "user", "content": "hi"}])
    assert waits == [0.5, 1.0, 2.0]


def test_client_error_fails_fast_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_TEST_KEY", "k-secret-999")
    with StubChatServer(lambda m: "never") as server:
        server.fail_next(401, '{"error": {"message": "bad key k-secret-999"}}')  # even if the server echoes it
        with pytest.raises(InputError, match="HTTP 401") as info:
            http_judge(server.url).complete([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 1
    assert "k-secret-999" not in str(info.value)


def test_cache_survives_a_give_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies that arrived before the endpoint failed for good are kept; the rerun asks only the rest."""
    monkeypatch.setenv("CAPDPO_TEST_KEY", "k")
    items = [JudgeItem(str(i), [{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    cache = tmp_path / "cache.jsonl"
    with StubChatServer(lambda m: "reply to " + m) as server:
        judge = http_judge(server.url, max_retries=0, workers=1)
        judge_items(items[:2], judge, cache)
        server.fail_next(500)
        with pytest.raises(InputError, match="gave up"):
            judge_items(items, judge, cache)
        assert len(read_jsonl(cache)) == 2
        result = judge_items(items, judge, cache)
    assert (result.cached, result.requested) == (2, 1)
    assert result.replies == {str(i): f"reply to question {i}" for i in range(3)}
    assert len(server.requests) == 2 + 1 + 1


def test_judge_config_checks() -> None:
    with pytest.raises(ConfigError, match="not both"):
        JudgeConfig(judge_url="http://x", judge_local="m")
    with pytest.raises(ConfigError, match="http"):
        JudgeConfig(judge_url="ftp://x")
    with pytest.raises(ConfigError, match="judge_model"):
        HttpJudge(JudgeConfig(judge_url="http://127.0.0.1:9/v1"))


# ---- local judge --------------------------------------------------------------------------------------------
def test_local_judge_on_tiny_model(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The tiny model's replies are random text: check the accounting, not the values."""
    records = json.loads((DATA / "mmhal_answers.json").read_text())[:5]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(records))
    out = tmp_path / "mmhal.json"
    args = ["--answers", str(answers), "--out", str(out), "--judge_local", str(tiny_models["weak"]),
            "--judge_max_tokens", "12", "--judge_batch_size", "2", "--device", "cpu"]  # fmt: skip
    mmhal.main(args)
    metrics = json.loads(out.read_text())
    reviews = read_jsonl(tmp_path / "mmhal.reviews.jsonl")
    assert len(reviews) == 5 and all(isinstance(r["reply"], str) for r in reviews)
    unparsed = [r["question_id"] for r in reviews if not r["parsed"]]
    assert metrics["unparseable"] == len(unparsed) and metrics["unparseable_ids"] == unparsed
    assert metrics["n_scored"] + metrics["unparseable"] == 5
    assert metrics["judge"]["kind"] == "local" and metrics["cache"] == {"hits": 0, "requests": 5}
    assert len(read_jsonl(tmp_path / "mmhal.judge_cache.jsonl")) == 5
    mmhal.main(args)  # rerun: nothing asked again, same replies
    again = json.loads(out.read_text())
    assert again["cache"] == {"hits": 5, "requests": 0}
    assert [r["reply"] for r in read_jsonl(tmp_path / "mmhal.reviews.jsonl")] == [r["reply"] for r in reviews]


def test_the_judge_never_follows_a_redirect_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_TEST_KEY", "k-123")
    with StubChatServer(lambda m: "rating: 6") as evil, StubChatServer(lambda m: "ok") as server:
        server.fail_next(302, "", {"Location": evil.url + "/chat/completions"})
        with pytest.raises(InputError, match="redirects to another host"):
            http_judge(server.url).complete([{"role": "user", "content": "hi"}])
    assert evil.requests == []  # the key and the prompt never reached it, and its reply was not taken


def test_in_flight_hands_on_every_arrived_result_before_a_failure() -> None:
    """The consumer falls behind while the worker finishes a failing call and two more: both later results come
    out, in the calls' order, before the failure is raised (a judge cache then keeps them)."""
    import time

    from capdpo.evaluation.judge import in_flight

    def fail() -> str:
        raise RuntimeError("dropped")

    calls = [("a", lambda: "A"), ("b", fail), ("c", lambda: "C"), ("d", lambda: "D")]
    got = []
    with pytest.raises(RuntimeError, match="dropped"):
        for key, value in in_flight(calls, workers=1):
            got.append((key, value))
            time.sleep(0.3)  # the single worker runs b, c and d meanwhile
    assert got == [("a", "A"), ("c", "C"), ("d", "D")]
