"""An OpenAI-compatible server answering with a local model, logprobs included (what vLLM and SGLang return and
`transformers serve` does not): the chat messages and the image as the server backend sends them, the answer
computed by capdpo's own engine. Used to check that scores read through a server equal the local ones."""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class ModelServer:
    """`with ModelServer(model_path) as server:` then point the backend at `server.url`."""

    def __init__(self, model: str) -> None:
        from capdpo.generation.engine import Engine
        from capdpo.models.loading import load_vlm

        self.engine = Engine(load_vlm(model, device="cpu"), decoder="hf")
        self.images = Path(tempfile.mkdtemp(prefix="capdpo-model-server-"))
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                try:
                    with server.lock:  # one model, one request at a time
                        payload, status = server.answer(body), 200
                except Exception as err:  # noqa: BLE001 - a server answers every request
                    payload, status = {"detail": repr(err)}, 500
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def _request(self, body: dict[str, Any]) -> Any:
        from capdpo.generation.batching import Request

        image, messages = None, []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                        image = self.images / hashlib.sha256(data).hexdigest()
                        image.write_bytes(data)
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        return Request(key="r", image=str(image) if image else None, messages=messages, seed=body.get("seed", 0))

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        from capdpo.generation.sampling import Generation

        request = self._request(body)
        tokenizer = self.engine.lm.tokenizer
        (output,) = self.engine.generate([request], Generation(max_new_tokens=body["max_tokens"]))
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": output.text},
            "finish_reason": output.finish_reason,
        }
        if body.get("logprobs"):
            (row,) = self.engine.forward_logprobs([request])
            top = row[0].topk(min(body.get("top_logprobs", 20), row.shape[-1]))
            entries = [
                {"token": tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(top.values, top.indices)
            ]
            choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
        return {
            "id": "x",
            "object": "chat.completion",
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }

    def __enter__(self) -> ModelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()
