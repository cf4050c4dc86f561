"""A local stand-in for an OpenAI-compatible chat-completions endpoint (threaded, 127.0.0.1, random port).

Replies come from a function of the request's last user message (else its last message), or from a queue of scripted failures that are
served first (`fail_next`). Every request's path, headers and body are recorded for the test to inspect.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubChatServer:
    """`with StubChatServer(reply_fn) as server:` then point a judge at `server.url`."""

    def __init__(self, reply: Callable[[str], str]) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[int, str, dict[str, str]]] = []  # (status, body, headers) served first
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    failure = stub.failures.pop(0) if stub.failures else None
                if failure:
                    self._send(failure[0], failure[1].encode(), failure[2])
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "unknown path"}}')
                    return
                # the last user message (a system-only request, as Object HalBench's, gives its system message)
                user = [m["content"] for m in body["messages"] if m["role"] == "user"] or [
                    body["messages"][-1]["content"]
                ]
                user = user[-1]
                payload = {
                    "id": f"chatcmpl-{len(stub.requests)}",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": stub.reply(user)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                self._send(200, json.dumps(payload).encode())

            def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail_next(
        self, status: int, body: str = '{"error": {"message": "server error"}}', headers: dict[str, str] | None = None
    ) -> None:
        """Serve this failure to the next request (queued; one request each)."""
        with self.lock:
            self.failures.append((status, body, headers or {}))

    def __enter__(self) -> StubChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
