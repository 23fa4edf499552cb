"""Pixels equal upstream LLaVA's whether or not torchvision is installed (issue #28).

Upstream preprocessed with transformers 4.37's `CLIPImageProcessor`. `reference_pixels` below is that processor step
by step in numpy + pillow; on the images of this file it gives transformers 4.37.2's output bit for bit
(docs/method.md, "Image preprocessing"). transformers 5 switches to its torchvision backend as soon as torchvision is
importable, and that backend's pixels differ; the project's processors must not.

`.ci/run` runs this file in two environments: its main one, without torchvision (LLAVA_TEST_TORCHVISION=0), and one
with torch + torchvision from the package index (LLAVA_TEST_TORCHVISION=1). A test meant for the other environment
skips; a variable that does not match the environment fails, so in CI every test here runs in one of the two.
"""

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessorPil
from transformers.utils import is_torchvision_available

from llava.mm_utils import (
    divide_to_patches,
    load_image_processor,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
)
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.testing.tiny_llava import TinySpec, write_clip_tower
from tests.helpers import CLIP_MEAN, CLIP_STD

# openai/clip-vit-large-patch14-336's preprocessor_config.json, the file every LLaVA-1.5/1.6 checkpoint points at
OPENAI_336 = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": 3,
    "size": 336,
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIZES = [(640, 480), (333, 500), (1000, 201), (200, 100)]  # landscape, portrait, very wide, upsampled
EXPECTED = os.environ.get("LLAVA_TEST_TORCHVISION")  # "1": torchvision must be installed, "0": must not


def needs_torchvision(installed: bool) -> None:
    """Skip a test meant for the other environment; fail when CI's LLAVA_TEST_TORCHVISION does not hold here."""
    available = is_torchvision_available()
    if EXPECTED in ("0", "1") and available != (EXPECTED == "1"):
        pytest.fail(f"LLAVA_TEST_TORCHVISION={EXPECTED} but torchvision is {'' if available else 'not '}installed")
    if available != installed:
        pytest.skip(f"needs an environment {'with' if installed else 'without'} torchvision (.ci/run runs it in one)")


def random_images() -> list[Image.Image]:
    rng = np.random.default_rng(28)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def edge(value) -> int:
    return int(value if isinstance(value, int) else next(iter(value.values())))


def reference_pixels(image: Image.Image, config: dict) -> torch.Tensor:
    """[3, crop, crop] as transformers 4.37's CLIPImageProcessor computed it for `config`."""
    size, crop = edge(config["size"]), edge(config["crop_size"])
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    resized = np.asarray(image.convert("RGB").resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None))
    top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
    cropped = resized[top : top + crop, left : left + crop]
    scaled = (cropped * (1 / 255)).astype(np.float32)  # uint8 * float is float64, then float32, as 4.37 did
    normalised = (scaled - np.array(config["image_mean"], np.float32)) / np.array(config["image_std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def reference_pad(image: Image.Image, config: dict) -> torch.Tensor:
    """LLaVA-1.5 'pad': square the image on the mean colour, then the processor."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in config["image_mean"]))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return reference_pixels(square, config)


def reference_anyres(image: Image.Image, config: dict) -> torch.Tensor:
    """LLaVA-1.6 'anyres': the whole image squashed to one crop, then the grid crops, each through the processor."""
    crop = edge(config["crop_size"])
    padded = resize_and_pad_image(image, select_best_resolution(image.size, PINPOINTS))
    overview = image.resize((edge(config["size"]),) * 2, Image.Resampling.BICUBIC)
    return torch.stack([reference_pixels(c, config) for c in [overview, *divide_to_patches(padded, crop)]])


REFERENCES = {"pad": reference_pad, "anyres": reference_anyres, None: reference_pixels}


@pytest.fixture(scope="module")
def clip_336(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip336")
    (folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_336))
    return folder


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory) -> Path:
    return write_clip_tower(tmp_path_factory.mktemp("tower") / "clip", TinySpec(), seed=0)


def model_cfg(aspect_ratio: str | None) -> dict:
    return {"image_aspect_ratio": aspect_ratio, "image_grid_pinpoints": PINPOINTS}


def assert_pixels_equal(got, want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape, index
        assert torch.equal(g, w), f"image {index} ({SIZES[index]}): max diff {(g - w).abs().max().item():.5f}"


def test_transformers_pillow_processor_is_the_reference(clip_336):
    """Pins the fact the default relies on: transformers 5's pillow path reproduces 4.37's processor exactly."""
    processor = CLIPImageProcessorPil.from_pretrained(clip_336)
    got = [processor.preprocess(image, return_tensors="pt")["pixel_values"][0] for image in random_images()]
    assert_pixels_equal(got, [reference_pixels(image, OPENAI_336) for image in random_images()])


@pytest.mark.parametrize("aspect_ratio", ["pad", "anyres", None])
def test_project_pixels_equal_the_reference(clip_336, aspect_ratio):
    """LLaVA-1.5 'pad', LLaVA-1.6 'anyres' and the plain resize + crop, with or without torchvision installed."""
    processor = load_image_processor(clip_336)
    assert processor.backend == "pil"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pillow path never warns about its pixels
        got = process_images(random_images(), processor, model_cfg(aspect_ratio))
    want = [REFERENCES[aspect_ratio](image, OPENAI_336) for image in random_images()]
    assert_pixels_equal(list(got), want)


def test_vision_tower_builds_the_pillow_processor(tiny_tower):
    """The processor load_pretrained_model and training hand out comes from the tower: pillow unless configured."""
    tower = CLIPVisionTower(str(tiny_tower), args=SimpleNamespace())
    assert tower.image_processor_backend == "pil" and tower.image_processor.backend == "pil"
    config = json.loads((tiny_tower / "preprocessor_config.json").read_text())
    got = process_images(random_images(), tower.image_processor, model_cfg("pad"))
    assert_pixels_equal(list(got), [reference_pad(image, config) for image in random_images()])


def test_unknown_backend_names_the_config_key(tiny_tower, clip_336):
    with pytest.raises(ValueError, match="image_processor_backend in the model config.*'fast'"):
        CLIPVisionTower(str(tiny_tower), args=SimpleNamespace(image_processor_backend="fast"))
    with pytest.raises(ValueError, match="backend must be one of pil, torchvision, got 'cv2'"):
        load_image_processor(clip_336, "cv2")


def test_torchvision_backend_without_torchvision_is_an_error(clip_336, tiny_tower):
    """transformers would fall back to pillow with a warning; an explicit choice that cannot be honoured is refused."""
    needs_torchvision(False)
    with pytest.raises(ImportError, match="needs torchvision, which is not installed"):
        load_image_processor(clip_336, "torchvision")
    with pytest.raises(ImportError, match="needs torchvision"):
        CLIPVisionTower(str(tiny_tower), args=SimpleNamespace(image_processor_backend="torchvision"))


def test_transformers_default_is_torchvision_here(clip_336):
    """The trap this file guards against is present in the torchvision environment: transformers' own default."""
    needs_torchvision(True)
    assert AutoImageProcessor.from_pretrained(clip_336).backend == "torchvision"
    assert load_image_processor(clip_336).backend == "pil"


def test_explicit_torchvision_backend_runs_and_is_not_upstream_exact(clip_336, tiny_tower):
    """The option really selects transformers' torchvision code path: close to upstream's pixels, not equal."""
    needs_torchvision(True)
    processor = load_image_processor(clip_336, "torchvision")
    assert processor.backend == "torchvision"
    with pytest.warns(UserWarning, match="torchvision backend, whose pixels differ"):
        got = process_images(random_images(), processor, model_cfg(None))
    want = torch.stack([reference_pixels(image, OPENAI_336) for image in random_images()])
    difference = (got - want).abs().amax(dim=(1, 2, 3))
    assert bool((difference > 0).all()), difference  # each random image differs somewhere ...
    assert float(difference.max()) < 0.05, difference  # ... by a rounding step or two of the resize
    tower = CLIPVisionTower(str(tiny_tower), args=SimpleNamespace(image_processor_backend="torchvision"))
    assert tower.image_processor.backend == "torchvision"


def test_family_without_a_pillow_processor_is_an_error(tmp_path):
    """A later model family whose processor transformers ships only on torchvision: no silent switch."""
    needs_torchvision(True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Sam2ImageProcessor"}))
    with pytest.raises(ValueError, match="no pil image processor for this model family"):
        load_image_processor(tmp_path)
