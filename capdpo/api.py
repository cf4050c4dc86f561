"""The one client of OpenAI-compatible HTTP APIs (judges of `eval/`, served models).

What it guarantees, whoever calls it:

* The API key is read from the environment variable the user names, sent only as `Authorization: Bearer` to the
  configured host, and never printed, logged or written; error messages have it redacted.
* Redirects are never followed blindly: a redirect to another host (or scheme, or port) is refused with a one-line
  error, since following it would hand the key to that host and take its reply as the answer; a redirect within
  the configured host (307/308, method kept) is followed. Proxy settings from the environment are ignored for the
  same reason.
* Retries with exponential backoff on timeouts, connection errors and HTTP 408/409/425/429/5xx (honouring
  `Retry-After`); other HTTP errors fail at once with the server's message.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from capdpo.errors import ConfigError, InputError

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
MAX_REDIRECTS = 3


class MalformedReply(Exception):
    """The server answered, but not with what the API promises (retried like a transient failure)."""


@dataclass
class ApiSettings:
    """Where the API is and how patient to be with it."""

    base_url: str  # e.g. https://api.openai.com/v1 (requests go to <base_url>/<path>)
    api_key_env: str = ""  # name of the environment variable holding the key ("" or unset: no key)
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 2.0  # first retry delay in seconds, doubled after every failure (capped at 60 s)
    what: str = "endpoint"  # how errors name it ("judge endpoint", "server")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class ApiClient:
    """POST JSON to an OpenAI-compatible API (see the module docstring); thread-safe."""

    def __init__(self, settings: ApiSettings, sleep: Callable[[float], None] = time.sleep) -> None:
        import httpx2

        if not settings.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{settings.what}: '{settings.base_url}' must start with http:// or https://")
        self.settings = settings
        self.base = settings.base_url.rstrip("/") + "/"
        self.origin = _origin(self.base)
        self.sleep = sleep
        self._key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        self._http = httpx2.Client(timeout=settings.timeout, follow_redirects=False, trust_env=False)

    def redact(self, text: str) -> str:
        """`text` with the API key blanked out."""
        return text.replace(self._key, "[redacted]") if self._key else text

    def url(self, path: str) -> str:
        return urljoin(self.base, path.lstrip("/"))

    def post(self, path: str, body: dict[str, Any], parse: Callable[[Any], Any] = lambda data: data) -> Any:
        """POST `body` to `<base_url>/<path>`; `parse(json reply)` (raising `MalformedReply` for a reply that is
        not what was asked) gives the result. Retries as the module docstring says.

        Raises:
            InputError: a redirect to another host, a non-retryable HTTP error, or no usable reply after every retry
                (one line, key redacted).
        """
        settings = self.settings
        last = ""
        for attempt in range(settings.max_retries + 1):
            wait = min(settings.backoff * 2**attempt, 60.0)
            try:
                status, payload, headers = self._send(self.url(path), body)
                if status == 200:
                    try:
                        return parse(json.loads(payload))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise MalformedReply(f"not JSON: {_short(payload, 120)}") from None
                last = f"HTTP {status} {_short(payload)}".strip()
                if status not in RETRYABLE_STATUS and status < 500:
                    raise InputError(f"{settings.what} {self.url(path)}: {self.redact(last)}")
                retry_after = headers.get("retry-after", "")
                if retry_after.strip().replace(".", "", 1).isdigit():
                    wait = min(max(wait, float(retry_after)), 120.0)
            except MalformedReply as err:
                last = f"malformed reply ({err})"
            except _Transient as err:
                last = str(err)
            if attempt < settings.max_retries:
                print(
                    f"{settings.what}: {self.redact(last)}; retry {attempt + 1}/{settings.max_retries} in {wait:.1f} s",
                    file=sys.stderr,
                )
                self.sleep(wait)
        raise InputError(
            f"{settings.what} {self.url(path)}: gave up after {settings.max_retries + 1} tries "
            f"(last: {self.redact(last)}); replies received so far are kept — rerun the same command to continue"
        )

    def _send(self, url: str, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        import httpx2

        headers = {"Content-Type": "application/json"}
        for _ in range(MAX_REDIRECTS + 1):
            if _origin(url) != self.origin:  # never reached: every URL followed is checked below
                raise InputError(f"{self.settings.what}: refusing to send a request to {url}")
            if self._key:
                headers["Authorization"] = f"Bearer {self._key}"
            try:
                response = self._http.post(url, content=json.dumps(body).encode("utf-8"), headers=headers)
            except httpx2.TimeoutException as err:
                raise _Transient(f"timeout ({type(err).__name__})") from None
            except httpx2.TransportError as err:
                raise _Transient(f"{type(err).__name__}: {err}") from None
            if response.status_code in (301, 302, 303, 307, 308):
                target = urljoin(url, response.headers.get("location", ""))
                if _origin(target) != self.origin:
                    raise InputError(
                        f"{self.settings.what} {self.base}: the server redirects to another host ({target}); "
                        "capdpo never sends the API key there — configure the final address instead"
                    )
                if response.status_code not in (307, 308):
                    raise InputError(
                        f"{self.settings.what} {self.base}: HTTP {response.status_code} redirect of a POST to "
                        f"{target} (it would become a GET); configure that address instead"
                    )
                url = target
                continue
            return response.status_code, response.content, {k.lower(): v for k, v in response.headers.items()}
        raise InputError(f"{self.settings.what} {self.base}: more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        self._http.close()


class _Transient(Exception):
    """A timeout or connection failure (retried)."""


def _short(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def chat_text(data: Any) -> str:
    """The message text of a chat-completions reply (`MalformedReply` if it has none)."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply(f"not a chat completion: {_short(json.dumps(data).encode(), 120)}") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise MalformedReply("message content is not text")
    return content
