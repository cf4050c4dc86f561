"""The `openai` backend against real servers: `transformers serve` with the tiny model (started and stopped here
by PID), and `ModelServer` (tests/generation/model_server.py), which answers with logprobs as vLLM and SGLang do.

Through a server, stages 2-4 and the eval answers write what the local backend writes: greedy text equal, yes/no
scores within 1e-3. A server killed mid-stage loses nothing: the stage stops with one line, the rerun continues.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from capdpo.errors import InputError
from capdpo.evaluation.answers import main as answers_main
from capdpo.jsonl import read_jsonl
from capdpo.sections import load_config
from capdpo.stages import generate_descriptions as describe
from capdpo.stages import regenerate_sentences as variants
from capdpo.stages import validate_sentences as validate
from tests.generation.model_server import ModelServer
from tests.helpers import count_lines, run_script
from tests.pipeline import write_config, write_images_stage

GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}
DESCRIBE = {**GREEDY, "samples_per_image": 1, "max_new_tokens": 48, "batch_size": 2}
VARIANTS = {**GREEDY, "k": 1, "max_rounds": 1, "max_new_tokens": 12, "batch_size": 4}
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`transformers serve <model>` on 127.0.0.1:<port>, started and killed by PID."""

    def __init__(self, model: Path, port: int, log: Path) -> None:
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + STARTUP_SECONDS
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"transformers serve exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.kill()
        raise AssertionError(
            f"transformers serve did not answer within {STARTUP_SECONDS} s: {self.log.read_text()[-2000:]}"
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def serve(tiny_models, tmp_path_factory):
    server = Serve(tiny_models["strong"], free_port(), tmp_path_factory.mktemp("serve") / "serve.log")
    server.start()
    yield server
    server.kill()


def server_sections(url: str, **extra) -> dict:
    return {"backend": "openai", "base_url": url, "max_retries": 1, "request_timeout": 60, **extra}


@pytest.fixture(scope="module")
def local_run(tiny_models, sample_images, tmp_path_factory):
    """Stages 2-3 on the local backend (greedy): the reference the server runs are checked against."""
    tmp = tmp_path_factory.mktemp("local")
    write_images_stage(tmp / "run", sample_images[:4])
    config = write_config(tmp / "run.yaml", tmp / "run", tiny_models, describe=DESCRIBE, variants=VARIANTS)
    describe.run(load_config("describe", ["--config", str(config)]))
    variants.run(load_config("variants", ["--config", str(config)]))
    return tmp / "run"


def texts(run_dir: Path) -> dict:
    return {
        (r["image_id"], r["prompt"]): (r["text"], r["finish_reason"])
        for r in read_jsonl(run_dir / "02_descriptions.jsonl")
    }


def rewrites(run_dir: Path) -> dict:
    return {
        (r["image_id"], r["index"]): (r["sentence"], r["variants"]) for r in read_jsonl(run_dir / "03_variants.jsonl")
    }


def test_stages_2_3_through_transformers_serve_equal_local_greedy(
    serve, local_run, tiny_models, sample_images, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    write_images_stage(run_dir, sample_images[:4])
    config = write_config(
        tmp_path / "run.yaml", run_dir, tiny_models,
        describe={**DESCRIBE, **server_sections(serve.url, max_concurrency=3)},
        variants={**VARIANTS, **server_sections(serve.url)},
        validate=server_sections(serve.url, server_model=str(tiny_models["strong"])),  # the model it serves
    )  # fmt: skip
    stats = describe.run(load_config("describe", ["--config", str(config)]))
    assert stats["server"]["requests"] == 4 and stats["server"]["requests_per_second"] > 0
    assert "Server: 4 requests" in capsys.readouterr().out
    assert texts(run_dir) == texts(local_run) and len(texts(run_dir)) == 4
    records = read_jsonl(run_dir / "02_descriptions.jsonl")
    assert {r["model"] for r in records} == {f"openai:{tiny_models['strong']}"}
    local_ids = {r["id"] for r in read_jsonl(local_run / "02_descriptions.jsonl")}
    assert not local_ids & {r["id"] for r in records}  # the backend enters the ids: never mixed with local ones

    variants.run(load_config("variants", ["--config", str(config)]))
    assert rewrites(run_dir) == rewrites(local_run) and rewrites(run_dir)

    # transformers serve returns no logprobs: scoring stops with one line instead of a silent 0.5
    with pytest.raises(InputError, match="no top_logprobs") as err:
        validate.run(load_config("validate", ["--config", str(config)]))
    assert "\n" not in str(err.value)
    assert not (run_dir / "04_scores.done").exists()


def test_server_killed_mid_stage_loses_nothing(serve, local_run, tiny_models, sample_images, tmp_path):
    run_dir = tmp_path / "run"
    write_images_stage(run_dir, sample_images)
    sections = {**DESCRIBE, "batch_size": 1, **server_sections(serve.url, max_concurrency=1)}
    config = write_config(tmp_path / "run.yaml", run_dir, tiny_models, describe=sections)
    out = run_dir / "02_descriptions.jsonl"

    def kill_after_two() -> None:
        deadline = time.time() + 300
        while count_lines(out) < 2 and time.time() < deadline:
            time.sleep(0.02)
        serve.kill()

    killer = threading.Thread(target=kill_after_two)
    killer.start()
    try:
        result = run_script("2_generate_descriptions.py", "--config", str(config))
    finally:
        killer.join()
        serve.start()  # the same URL again, for the rerun and the later tests
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "gave up after 2 tries" in error[0] and "rerun" in error[0], result.stderr
    kept = count_lines(out)
    assert 2 <= kept < 6 and not (run_dir / "02_descriptions.done").exists()

    result = run_script("2_generate_descriptions.py", "--config", str(config))
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 6
    reference = write_config(
        tmp_path / "ref.yaml", tmp_path / "ref", tiny_models, describe={**DESCRIBE, "batch_size": 1}
    )
    write_images_stage(tmp_path / "ref", sample_images)
    describe.run(load_config("describe", ["--config", str(reference)]))
    assert texts(run_dir) == texts(tmp_path / "ref")


def test_eval_answers_through_transformers_serve_equal_local(serve, tiny_models, sample_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for n, src in enumerate(sample_images[:3], start=1):
        shutil.copy(src, images / f"AMBER_{n}.jpg")
    queries = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
               {"id": 2, "image": "AMBER_2.jpg", "query": "Describe this image."},
               {"id": 1005, "image": "AMBER_3.jpg", "query": "Is there a ball in this image?"}]  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(queries))
    common = ["--benchmark", "amber", "--model", str(tiny_models["strong"]), "--data", str(tmp_path / "q.json"),
              "--images", str(images), "--max_new_tokens", "12", "--yes_no_max_new_tokens", "3", "--device", "cpu",
              "--temperature", "0", "--repetition_penalty", "1.0"]  # fmt: skip
    answers_main([*common, "--out", str(tmp_path / "local" / "amber.json")])
    answers_main([*common, "--out", str(tmp_path / "served" / "amber.json"), "--backend", "openai",
                  "--base_url", serve.url])  # fmt: skip

    def work(folder: str) -> dict:
        return {r["id"]: r["text"] for r in read_jsonl(tmp_path / folder / "amber.work.jsonl")}

    assert work("served") == work("local") and len(work("local")) == 3
    assert json.loads((tmp_path / "served" / "amber.json").read_text()) == json.loads(
        (tmp_path / "local" / "amber.json").read_text()
    )


def test_yesno_scores_through_a_logprob_server_equal_local(local_run, tiny_models, tmp_path):
    local_dir, served_dir = tmp_path / "local", tmp_path / "served"
    for d in (local_dir, served_dir):
        d.mkdir()
        for name in ("01_images.jsonl", "01_images.done", "03_variants.jsonl", "03_variants.done"):
            shutil.copy(local_run / name, d / name)
    vocab = 2048  # every token's log-probability: a random tiny model puts yes/no anywhere in its ranking
    validate.run(load_config("validate", ["--config", str(write_config(tmp_path / "l.yaml", local_dir, tiny_models))]))
    with ModelServer(str(tiny_models["weak"])) as server:
        sections = server_sections(server.url, server_top_logprobs=vocab, max_concurrency=2)
        config = write_config(tmp_path / "s.yaml", served_dir, tiny_models, validate=sections)
        stats = validate.run(load_config("validate", ["--config", str(config)]))
    assert stats["server"]["requests"] == stats["candidates"]

    def scores(run_dir: Path) -> dict:
        return {
            (r["variants_id"], c["text"]): (c["score"], c["details"])
            for r in read_jsonl(run_dir / "04_scores.jsonl")
            for c in r["candidates"]
        }

    local, served = scores(local_dir), scores(served_dir)
    assert local.keys() == served.keys() and len(local) >= 4
    for key, (score, details) in local.items():
        assert served[key][0] == pytest.approx(score, abs=1e-3), key
        assert served[key][1]["yesno"]["p_yes"] == pytest.approx(details["yesno"]["p_yes"], rel=1e-2), key
    assert max(s for s, _ in local.values()) - min(s for s, _ in local.values()) > 1e-3  # not all 0.5

    # a server whose top tokens hold neither yes nor no: one line, never a silent 0.5
    with ModelServer(str(tiny_models["weak"])) as server:
        sections = server_sections(server.url, server_top_logprobs=1)
        run_dir = tmp_path / "few"
        shutil.copytree(served_dir, run_dir, ignore=shutil.ignore_patterns("04_*", ".locks"))
        config = write_config(tmp_path / "f.yaml", run_dir, tiny_models, validate=sections)
        with pytest.raises(InputError, match="hold neither 'Yes' nor 'No'"):
            validate.run(load_config("validate", ["--config", str(config)]))


def test_rating_needs_the_local_backend():
    from capdpo.errors import ConfigError
    from capdpo.validation.config import ValidateConfig
    from capdpo.validation.validator import Validator

    server = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ConfigError, match="validate.methods: rating .*backend: local"):
        ValidateConfig(methods=["yesno", "rating"], **server)
    assert [m.name for m in Validator(None, ValidateConfig(methods=["yesno", "pairwise"], **server)).methods] == [
        "yesno",
        "pairwise",
    ]


def test_requests_carry_the_image_seed_and_sampling_and_retry(sample_images, monkeypatch):
    """What goes over the wire: the local backend's chat with the image, each request's seed, only the sampling
    settings that apply, the key from the environment; a 503 is retried."""
    import base64

    from capdpo.generation.batching import Request, user_message
    from capdpo.generation.config import DescribeConfig
    from capdpo.generation.sampling import Generation
    from capdpo.generation.server import ServerBackend
    from tests.evaluation.stub_server import StubChatServer

    monkeypatch.setenv("CAPDPO_TEST_SERVER_KEY", "sk-test-secret")
    requests = [Request(key=f"k{i}", image=str(p), messages=[user_message("Describe.")], seed=100 + i)
                for i, p in enumerate(sample_images[:3])]  # fmt: skip
    with StubChatServer(lambda user: "A ball.") as stub:
        stub.fail_next(503, '{"error": "busy"}')
        section = DescribeConfig(backend="openai", base_url=stub.url, server_model="served-vlm", max_concurrency=2,
                                 server_key_env="CAPDPO_TEST_SERVER_KEY")  # fmt: skip
        backend = ServerBackend(section, "ignored")
        backend.client.sleep = lambda seconds: None
        outputs = backend.generate(requests, Generation(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=0))
        assert [o.key for o in outputs] == ["k0", "k1", "k2"] and {o.text for o in outputs} == {"A ball."}
        bodies = [r["body"] for r in stub.requests]
        assert len(bodies) == 4  # one 503, retried
        by_seed = {b["seed"]: b for b in bodies}
        assert sorted(by_seed) == [100, 101, 102]
        for i, path in enumerate(sample_images[:3]):
            body = by_seed[100 + i]
            assert body["model"] == "served-vlm" and body["max_tokens"] == 9 and body["temperature"] == 0.7
            assert body["top_p"] == 0.9 and "top_k" not in body and "repetition_penalty" not in body
            (image, text) = body["messages"][0]["content"]
            assert text == {"type": "text", "text": "Describe."}
            header, data = image["image_url"]["url"].split(",", 1)
            assert header.startswith("data:image/") and base64.b64decode(data) == path.read_bytes()
        assert all(r["headers"]["Authorization"] == "Bearer sk-test-secret" for r in stub.requests)

        section.image_transport = "file_url"
        backend = ServerBackend(section, "ignored")
        backend.generate(requests[:1], Generation(max_new_tokens=4, temperature=0.0, repetition_penalty=1.1))
        body = stub.requests[-1]["body"]
        assert body["messages"][0]["content"][0]["image_url"]["url"] == sample_images[0].resolve().as_uri()
        assert body["repetition_penalty"] == 1.1 and "top_p" not in body
    assert backend.throughput()["requests"] == 1


def test_stages_through_a_server_never_write_or_print_its_key(
    tiny_models, sample_images, tmp_path, monkeypatch, capsys
):
    """The key of `server_key_env` goes in the Authorization header of each request and nowhere else: not in any
    file of the run directory (records, provenance, resolved config, stats) nor in what the stages print."""
    from tests.evaluation.stub_server import StubChatServer

    secret = "sk-capdpo-never-written-7f3a"
    monkeypatch.setenv("CAPDPO_TEST_SERVER_KEY", secret)
    run_dir = tmp_path / "run"
    write_images_stage(run_dir, sample_images[:2])
    with StubChatServer(lambda user: "A red ball lies on the grass. A brown dog sits next to it.") as stub:
        served = server_sections(stub.url, server_model="served-vlm", server_key_env="CAPDPO_TEST_SERVER_KEY")
        config = write_config(tmp_path / "run.yaml", run_dir, tiny_models, describe={**DESCRIBE, **served},
                              variants={**VARIANTS, **served})  # fmt: skip
        describe.run(load_config("describe", ["--config", str(config)]))
        variants.run(load_config("variants", ["--config", str(config)]))
        assert stub.requests and all(r["headers"]["Authorization"] == f"Bearer {secret}" for r in stub.requests)
    assert read_jsonl(run_dir / "03_variants.jsonl")  # the stages ran through the server
    printed = capsys.readouterr()
    assert secret not in printed.out and secret not in printed.err
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any(f.name.endswith(".config.yaml") for f in files)  # the resolved config was written, without the key
    assert all(secret.encode() not in f.read_bytes() for f in files), [
        f.name for f in files if secret.encode() in f.read_bytes()
    ]
    assert "CAPDPO_TEST_SERVER_KEY" in (run_dir / "02_descriptions.config.yaml").read_text()  # its name is kept
