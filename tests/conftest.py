"""Shared fixtures: tiny offline models (built once per session), small images, a run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker (and per process a test starts): the workers already use every core, and
    # oversubscribed BLAS threads made the long tests several times slower than alone
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long end-to-end tests (marked slow, the longest by their `seconds`) first: with `-n 2` the workers start on
    them, instead of one of them starting last and keeping a worker busy after the other has finished."""

    def order(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -float(slow.kwargs.get("seconds", 0)) if slow else 0.0

    items.sort(key=order)


@pytest.fixture(autouse=True)
def _default_image_limits():
    """Image limits are per process (a run config sets them): every test starts from the defaults."""
    from capdpo.images import Limits, set_limits

    yield
    set_limits(Limits().pixels, Limits().bytes)


@pytest.fixture(autouse=True)
def _plain_text_rotary():
    """`fuse_text_elementwise` points a modeling file's rotary function at a compiled kernel for the whole process:
    every test starts from transformers' own."""
    import sys

    yield
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and module is not None:
            plain = getattr(vars(module).get("apply_rotary_pos_emb"), "capdpo_plain", None)
            if plain is not None:
                module.apply_rotary_pos_emb = plain


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the tiny random-weight models: strong, weak (Qwen2.5-VL), qwen3vl, llava."""
    from capdpo.models.tiny import build_all

    cache = os.environ.get("CAPDPO_TINY_MODELS")  # reuse a prebuilt folder when given (faster local runs)
    out = Path(cache) if cache else tmp_path_factory.mktemp("tiny_models")
    return build_all(out)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six small distinct RGB images (PNG and JPEG) with simple shapes."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    paths = []
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (150, 60, 200), (30, 30, 30)]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (96 + 16 * i, 80), (240, 240, 240))
        draw = ImageDraw.Draw(image)
        draw.ellipse((10 + i, 10, 60 + i, 60), fill=colour)
        path = folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
        image.save(path)
        paths.append(path)
    return paths
