"""InternVL2's dynamic tiling gives the pixels of the official torchvision-based code, without torchvision.

`official_load_image` transcribes OpenGVLab/InternVL (2410d1db) `internvl/train/dataset.py`: `dynamic_preprocess` and
`find_closest_aspect_ratio` line by line, and `build_transform` (Resize((S, S), BICUBIC), ToTensor, Normalize) as
torchvision 0.28 executes it on a PIL image (`F_pil.resize` = `img.resize(size[::-1], interpolation)`;
`to_tensor` = uint8 HWC -> CHW float / 255; `F_t.normalize` = clone, sub_, div_ with float32 mean / std).
`llava.model.internvl.image_processing` is written differently (grids and crops as loops over rows and columns), and
must equal it bit for bit. Where torchvision is installed, the real transforms are compared too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

from llava.model.internvl.configuration_internvl_chat import IMAGENET_MEAN, IMAGENET_STD
from llava.model.internvl.image_processing import InternVLImageProcessor, candidate_grids, closest_grid

# (width, height): square, landscape, portrait, extreme, tiny, exact tile multiple, odd sizes
SIZES = [(448, 448), (640, 480), (333, 500), (1000, 201), (31, 700), (2, 3), (896, 448), (1111, 777), (600, 601)]


def official_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def official_dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = official_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size
    )
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def torchvision_steps(img: Image.Image, input_size: int) -> torch.Tensor:
    """T.Lambda(RGB) + T.Resize((S, S), BICUBIC) + T.ToTensor() + T.Normalize(IMAGENET) as torchvision runs them."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    img = img.resize((input_size, input_size), Image.Resampling.BICUBIC)  # F_pil.resize(img, [S, S], BICUBIC)
    tensor = torch.from_numpy(np.array(img, np.uint8, copy=True))
    tensor = tensor.view(img.size[1], img.size[0], 3).permute((2, 0, 1)).contiguous()
    tensor = tensor.to(dtype=torch.get_default_dtype()).div(255)
    tensor = tensor.clone()
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def official_load_image(image: Image.Image, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    """The model card's load_image on an opened image: RGB, dynamic_preprocess with thumbnail, transform, stack."""
    image = image.convert("RGB")
    tiles = official_dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([torchvision_steps(tile, input_size) for tile in tiles])


def random_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("size", SIZES)
def test_tiles_equal_official_code_bit_for_bit(size):
    image = random_image(size, seed=sum(size))
    ours = InternVLImageProcessor(tile_size=448, max_num=12)([image])["pixel_values"][0]
    official = official_load_image(image, 448, 12)
    assert ours.shape == official.shape
    assert ours.dtype == torch.float32
    assert torch.equal(ours, official)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb_as_officially(mode):
    image = random_image((250, 150), seed=3, mode=mode)
    ours = InternVLImageProcessor(tile_size=56, max_num=6)([image])["pixel_values"][0]
    assert ours.shape[0] > 1
    assert torch.equal(ours, official_load_image(image, 56, 6))


def test_tile_counts_follow_the_aspect_ratio():
    processor = InternVLImageProcessor(tile_size=448, max_num=12)
    counts = {size: len(processor.tiles(Image.new("RGB", size))) for size in SIZES}
    assert counts[(448, 448)] == 1  # one tile, no thumbnail
    assert counts[(896, 448)] == 3  # 2x1 grid + thumbnail
    assert counts[(31, 700)] == 13  # the 1x12 grid + thumbnail
    assert counts[(1000, 201)] == 6  # 5x1 (aspect 4.98) + thumbnail
    assert len(set(counts.values())) >= 5


def test_candidate_grids_and_ties():
    grids = candidate_grids(1, 12)
    assert len(grids) == len(set(grids))
    assert all(1 <= c * r <= 12 for c, r in grids)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    assert set(grids) == {(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12}
    # 1000x500 is exactly 2:1 -> (2, 1), and the tie with (4, 2) goes to (4, 2) only when the image is big enough
    assert closest_grid(1000, 500, grids, 448) == (2, 1)
    assert closest_grid(4000, 2000, grids, 448) == (4, 2)


def test_processor_reads_the_checkpoint_settings():
    class Config:
        tile_size, min_dynamic_patch, max_dynamic_patch, use_thumbnail, dynamic_image_size = 112, 1, 4, False, True

    processor = InternVLImageProcessor.from_model_config(Config())
    pixels = processor(random_image((1000, 100), 1))["pixel_values"][0]
    assert pixels.shape == (4, 3, 112, 112)  # at most 4 tiles, no thumbnail
    Config.dynamic_image_size = False
    single = InternVLImageProcessor.from_model_config(Config())(random_image((1000, 100), 1))["pixel_values"][0]
    assert torch.equal(single, torchvision_steps(random_image((1000, 100), 1), 112)[None])


@pytest.mark.skipif(not is_torchvision_available(), reason="compares with torchvision's own transforms")
@pytest.mark.parametrize("size", SIZES[:5])
def test_equal_to_torchvision_transforms(size):
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    transform = T.Compose(
        [
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    image = random_image(size, seed=7)
    tiles = official_dynamic_preprocess(image, image_size=448, use_thumbnail=True, max_num=12)
    official = torch.stack([transform(tile) for tile in tiles])
    assert torch.equal(InternVLImageProcessor()([image])["pixel_values"][0], official)
