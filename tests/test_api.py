"""capdpo.api: the API key goes only to the configured host; redirects elsewhere are refused; proxies from the
environment are ignored (they would see the key of a plain-HTTP endpoint)."""

from __future__ import annotations

import pytest

from capdpo.api import ApiClient, ApiSettings, chat_text
from capdpo.errors import InputError
from tests.evaluation.stub_server import StubChatServer

KEY = "sk-secret-123"
MESSAGES = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def client(url: str, monkeypatch: pytest.MonkeyPatch) -> ApiClient:
    monkeypatch.setenv("CAPDPO_TEST_KEY", KEY)
    return ApiClient(ApiSettings(url, "CAPDPO_TEST_KEY", timeout=5, max_retries=1, backoff=0.0), sleep=lambda s: None)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_refused_and_the_other_host_gets_nothing(monkeypatch, status) -> None:
    with StubChatServer(lambda m: "evil") as evil, StubChatServer(lambda m: "ok") as good:
        good.fail_next(status, "", {"Location": evil.url + "/chat/completions"})
        api = client(good.url, monkeypatch)
        with pytest.raises(InputError, match="redirects to another host") as err:
            api.post("chat/completions", MESSAGES, chat_text)
        assert KEY not in str(err.value) and "\n" not in str(err.value)
        assert evil.requests == []  # neither the request nor the key left for the other host
        assert good.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_localhost_and_127_0_0_1_are_different_hosts(monkeypatch) -> None:
    with StubChatServer(lambda m: "ok") as good:
        port = good.url.split(":")[2].split("/")[0]
        good.fail_next(307, "", {"Location": f"http://localhost:{port}/v1/chat/completions"})
        with pytest.raises(InputError, match="another host"):
            client(good.url, monkeypatch).post("chat/completions", MESSAGES, chat_text)
        assert len(good.requests) == 1


def test_a_redirect_within_the_host_keeps_the_method_and_is_followed(monkeypatch) -> None:
    with StubChatServer(lambda m: "ok: " + m) as good:
        good.fail_next(308, "", {"Location": "/v1/chat/completions"})
        api = client(good.url.removesuffix("/v1") + "/old", monkeypatch)
        assert api.post("chat/completions", MESSAGES, chat_text) == "ok: hi"
        assert [r["path"] for r in good.requests] == ["/old/chat/completions", "/v1/chat/completions"]
        assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in good.requests)
        good.fail_next(302, "", {"Location": "/v1/chat/completions"})  # would turn the POST into a GET
        with pytest.raises(InputError, match="would become a GET"):
            api.post("chat/completions", MESSAGES, chat_text)


def test_proxy_settings_in_the_environment_are_not_used(monkeypatch) -> None:
    with StubChatServer(lambda m: "proxy saw it") as proxy, StubChatServer(lambda m: "direct") as good:
        monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/v1"))
        monkeypatch.setenv("http_proxy", proxy.url.removesuffix("/v1"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert client(good.url, monkeypatch).post("chat/completions", MESSAGES, chat_text) == "direct"
        assert proxy.requests == []


def test_errors_never_show_the_key(monkeypatch) -> None:
    with StubChatServer(lambda m: "ok") as good:
        good.fail_next(401, f'{{"error": "bad key {KEY}"}}')
        with pytest.raises(InputError, match="HTTP 401") as err:
            client(good.url, monkeypatch).post("chat/completions", MESSAGES, chat_text)
        assert KEY not in str(err.value) and "[redacted]" in str(err.value)
