"""Shared fixtures: a tiny random LLaVA-1.5 checkpoint in the original release format, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "assets" / "llama2-tokenizer.model"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from llava.model.tiny import write_tiny_llava

    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_llava(root / "llava-v1.5-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """(tokenizer, model, image_processor, context_len) loaded through the real loader."""
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(tiny_ckpt), None, None, device="cpu")


def random_image(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(i, size) for i, size in enumerate([(120, 90), (64, 160), (112, 112), (200, 50)])]
