"""A batch that asks several questions about one image (POPE: six per image and category, next to each other) sends
that image through the vision tower once, unless the method reads the question or draws random numbers; every row
gets exactly what a batch without repeats gives it (pruning.visual.select_visual_tokens)."""

from __future__ import annotations

import pytest
import torch

from llava.mm_utils import process_images
from pruning import PruningConfig, registry
from pruning.visual import distinct_rows
from tests.helpers import load_on_cpu, mixed_images

REPEATS = [0, 1, 0, 0, 2, 1]  # rows of the batch: images 0, 1, 0, 0, 2, 1
QUESTIONS = ["Is there a dog?", "Count.", "Is there a dog?", "Why?", "Count.", "Count."]
TEXT_BLIND = ["none", "longtail", "topk", "tome", "prumerge_plus", "visionzip", "divprune"]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_on_cpu(tiny_ckpt)


@pytest.fixture(scope="module")
def pixels(loaded) -> torch.Tensor:
    _, model, processor = loaded
    return process_images(mixed_images()[:3], processor, model.config)


def select(model, pixels: torch.Tensor, texts=None, grad: bool = False, **config):
    """(the tower's output for the batch, the number of rows its embeddings saw)."""
    tower = model.get_vision_tower()
    rows = []
    hook = tower.vision_tower.embeddings.register_forward_hook(
        lambda _module, inputs, _output: rows.append(inputs[0].shape[0])
    )
    try:
        with torch.set_grad_enabled(grad):
            out = tower.select(pixels, PruningConfig(**config), model.get_model().mm_projector, texts)
    finally:
        hook.remove()
    return out, sum(rows)


def assert_same_rows(batch, reference, order) -> None:
    """Row b of ``batch`` equals row ``order[b]`` of ``reference`` in every field."""
    for name in ("features", "mask", "indices", "n", "kept", "inflection", "scores"):
        got, want = getattr(batch, name), getattr(reference, name)
        if want is None:
            assert got is None, name
            continue
        assert torch.equal(got, want[order]), name


def test_methods_registered_as_text_blind_are_the_ones_that_never_read_the_question() -> None:
    blind = {m.name for m in registry.methods("visual_pruning") if not m.reads_text}
    assert set(TEXT_BLIND) <= blind and "recovery" not in blind


@pytest.mark.parametrize("method", TEXT_BLIND)
def test_a_repeated_image_goes_through_the_tower_once_and_every_row_gets_its_tokens(loaded, pixels, method) -> None:
    _, model, _ = loaded
    params = {p.name for p in registry.get("visual_pruning", method).params}
    settings = {k: v for k, v in {"visual_topk": 20, "visual_layer": 2}.items() if k in params}
    settings["visual_pruning"] = method
    reference, seen = select(model, pixels, **settings)  # the three distinct images
    assert seen == 3
    batch, seen = select(model, pixels[REPEATS], QUESTIONS, **settings)
    assert seen == 3  # not 6
    assert_same_rows(batch, reference, REPEATS)
    tower = model.get_vision_tower().vision_tower
    tower.requires_grad_(True)  # a tower being trained sees every row, as before
    try:
        trained, seen = select(model, pixels[REPEATS], QUESTIONS, grad=True, **settings)
    finally:
        tower.requires_grad_(False)
    assert seen == 6
    assert torch.equal(trained.kept, batch.kept)


def test_a_method_that_reads_the_question_runs_each_question(loaded, pixels) -> None:
    _, model, _ = loaded
    batch, seen = select(model, pixels[REPEATS], QUESTIONS, visual_pruning="recovery")
    assert seen == 4  # rows 0 and 2 ask the same about image 0, rows 1 and 5 about image 1; row 3 another question
    for row in range(len(REPEATS)):
        image = pixels[REPEATS[row] : REPEATS[row] + 1]
        single, _ = select(model, image, QUESTIONS[row : row + 1], visual_pruning="recovery")
        count = int(single.kept[0])
        assert int(batch.kept[row]) == count
        assert torch.equal(batch.indices[row, :count], single.indices[0, :count])
        torch.testing.assert_close(batch.features[row, :count], single.features[0, :count], rtol=1e-5, atol=1e-5)


def test_a_method_that_draws_sees_every_row(loaded, pixels) -> None:
    """'random' draws new patches for each image of a batch, repeated or not."""
    _, model, _ = loaded
    batch, seen = select(model, pixels[REPEATS], visual_pruning="random", visual_topk=10, seed=3, visual_layer=2)
    assert seen == 6
    assert not torch.equal(batch.indices[0], batch.indices[2])


def test_distinct_rows_compares_pixels_exactly_and_questions_when_given() -> None:
    pixels = torch.zeros(5, 3, 4, 4)
    pixels[1, 0, 0, 0] = 1.0
    pixels[3] = pixels[1]
    pixels[4, 2, 3, 3] = 1e-7  # a difference the sum of the row alone would miss next to a large value
    pixels[4, 0, 0, 0] = 1.0
    first, where = distinct_rows(pixels, None)
    assert first == [0, 1, 4] and where.tolist() == [0, 1, 0, 1, 2]
    first, where = distinct_rows(pixels, ["a", "a", "b", "a", "a"])  # row 2: the pixels of row 0, another question
    assert first == [0, 1, 2, 4] and where.tolist() == [0, 1, 2, 1, 3]
