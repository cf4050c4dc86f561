"""The decode-attention kernel under Triton's interpreter on the CPU, in its own process (the interpreter must be
chosen before Triton is imported): equal to SDPA over the written slots and reading none past them, as close to
float32 as SDPA in half precision, reading a shared prompt from its source row, SDPA itself
outside a decode step, and the static decoder's tokens (greedy and sampled, three architectures) those of
`generate` with every decode step's attention through the kernel."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def test_the_decode_attention_kernel_under_the_interpreter(tiny_models, sample_images):
    pytest.importorskip("triton")
    models = [str(tiny_models[arch]) for arch in ("strong", "qwen3vl", "llava")]
    result = subprocess.run(
        [sys.executable, "-m", "tests.generation.interpreted_decode_attention", *models, "--",
         *map(str, sample_images)],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    passed = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(passed) == 3 + 1 + 1 + 1 + 3, result.stdout


def test_the_kernel_is_on_by_default_only_where_compiled_kernels_run(tiny_models, monkeypatch):
    """`StaticDecoder(decode_kernel=None)`: on for a CUDA model when compiled kernels run there (Triton, and not
    CAPDPO_NO_COMPILE=1), off on the CPU; an explicit choice stands; the engine passes `decode_kernel=False` on."""
    from types import SimpleNamespace

    import torch

    from capdpo.generation.static_decoder import StaticDecoder
    from capdpo.models import patches
    from capdpo.models.loading import load_vlm

    lm = load_vlm(str(tiny_models["strong"]))
    assert StaticDecoder(lm).decode_kernel is False  # the CPU
    on_cuda = SimpleNamespace(model=lm.model, device=torch.device("cuda"))
    monkeypatch.setattr(patches, "compiling_on_cuda", lambda: True)
    assert StaticDecoder(on_cuda).decode_kernel is True
    assert StaticDecoder(on_cuda, decode_kernel=False).decode_kernel is False
    monkeypatch.setattr(patches, "compiling_on_cuda", lambda: False)  # no Triton, or CAPDPO_NO_COMPILE=1
    assert StaticDecoder(on_cuda).decode_kernel is False
    assert StaticDecoder(lm, decode_kernel=True).decode_kernel is True  # asked for: where it can run it does

    from capdpo.generation.engine import Engine

    monkeypatch.setattr(patches, "compiling_on_cuda", lambda: True)
    captured = []
    init = StaticDecoder.__init__
    monkeypatch.setattr(StaticDecoder, "__init__", lambda self, *a, **k: captured.append(k) or init(self, *a, **k))
    Engine(lm, decode_kernel=False)
    Engine(lm)
    assert [k["decode_kernel"] for k in captured] == [False, None]
