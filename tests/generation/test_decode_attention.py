"""The decode-attention kernel under Triton's interpreter on the CPU, in its own process (the interpreter must be
chosen before Triton is imported): equal to SDPA over the written slots and reading none past them, SDPA itself
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
    assert len(passed) == 3 + 1 + 3, result.stdout
