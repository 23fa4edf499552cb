"""Shared fixtures: a tiny random LLaVA-1.5 checkpoint in the original release format, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import random_image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if "PYTEST_XDIST_WORKER" in os.environ:
    # An xdist worker shares the cores with the others: torch's default of one thread per core in every worker
    # oversubscribes them (the demo ran in 1.6x the time, at 1.8x the CPU time, with the same answers). Set before
    # torch loads, here and in the commands the tests start; a value the caller set is kept.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from llava.testing.tiny_llava import write_tiny_llava

    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_llava(root / "llava-v1.5-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """(tokenizer, model, image_processor, context_len) loaded through the real loader."""
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(tiny_ckpt), None, None, device="cpu")


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(i, size) for i, size in enumerate([(120, 90), (64, 160), (112, 112), (200, 50)])]
