"""Shared fixtures: a tiny random LLaVA-1.5 checkpoint in the original release format, built once per session."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from PIL import Image

pytest.register_assert_rewrite("tests.helpers")  # its shared assertions report their values, as the tests' do

from tests.helpers import load_on_cpu, mixed_images, write_deep_llava  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if "PYTEST_XDIST_WORKER" in os.environ:
    # An xdist worker shares the cores with the others: torch's default of one thread per core in every worker
    # oversubscribes them (the demo ran in 1.6x the time, at 1.8x the CPU time, with the same answers). Set before
    # torch loads, here and in the commands the tests start; a value the caller set is kept.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (`--dist loadfile`) hands out files in collection order instead of by their number of tests, so the
    # files with slow tests, collected first (below), start first and the workers end together (issue #18)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` first, those with ``slow(start=N)`` in the order of N before the others,
    each file's tests kept together and in their order."""
    starts: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            start = float(marker.kwargs.get("start", math.inf))
            starts[item.path] = min(start, starts.get(item.path, math.inf))
    items.sort(key=lambda item: (item.path not in starts, starts.get(item.path, math.inf)))


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
    return mixed_images()


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory) -> Path:
    """tests.helpers.write_deep_llava's checkpoint: 6 decoder layers, grouped-query attention (LLM-side methods)."""
    return write_deep_llava(tmp_path_factory.mktemp("deep"))


@pytest.fixture(scope="module")
def deep(deep_ckpt):
    """(tokenizer, model, image processor) of ``deep_ckpt``."""
    return load_on_cpu(deep_ckpt)
