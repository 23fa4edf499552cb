"""Phi-3-vision preprocessing: our pillow + torch processor gives the pixels of the official Phi3VImageProcessor
(image_processing_phi3_v.py, hub commit c45209e9), transcribed below line by line; the crop grid and the token
count formula; the tokenizer reads tokenizer.json as the official (fast) tokenizer does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from llava.model.phi3v.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    HDGrid,
    Phi3VImageError,
    Phi3VImageProcessor,
    hd_grid,
    hd_grid_for_num_crops,
    num_image_tokens,
)
from tests.helpers import random_image

# (width, height): landscape, portrait, square, very wide, very tall, tiny, odd sizes
SIZES = [(120, 90), (64, 160), (112, 112), (400, 50), (40, 320), (30, 20), (337, 335), (1000, 999), (3, 700)]


# ---- transcription of the official processor ----------------------------------------------------------------
# torchvision.transforms.functional on a PIL image is PIL itself (torchvision/transforms/_functional_pil.py):
# resize(img, [h, w]) -> img.resize((w, h), Image.BILINEAR); pad(img, [l, t, r, b], fill) -> ImageOps.expand.
def official_padding_336(b):
    width, height = b.size
    tar = int(np.ceil(height / 336) * 336)
    top_padding = int((tar - height) / 2)
    bottom_padding = tar - height - top_padding
    left_padding = 0
    right_padding = 0
    return ImageOps.expand(b, border=(left_padding, top_padding, right_padding, bottom_padding), fill=(255, 255, 255))


def official_hd_transform(img, hd_num=16):
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    img = official_padding_336(img)
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return img


def official_to_tensor_normalize(pic, mean, std):
    # torchvision ToTensor, then Normalize (sub_ then div_)
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
    tensor = img.to(dtype=torch.get_default_dtype()).div(255)
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype)
    std_t = torch.as_tensor(std, dtype=tensor.dtype)
    return tensor.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])


def official_pad_to_max_num_crops_tensor(images, max_crops=5):
    B, _, H, W = images.shape
    if B < max_crops:
        pad = torch.zeros(max_crops - B, 3, H, W, dtype=images.dtype, device=images.device)
        images = torch.cat([images, pad], dim=0)
    return images


def official_preprocess(images, num_crops, image_mean=CLIP_MEAN, image_std=CLIP_STD):
    """Phi3VImageProcessor.preprocess: (pixel_values [B, num_crops + 1, 3, 336, 336], image_sizes, num_img_tokens)."""
    images = [image.convert("RGB") for image in images]  # convert_to_rgb of transformers 4.38, then convert('RGB')
    elems = [official_hd_transform(im, hd_num=num_crops) for im in images]
    hd_images = [official_to_tensor_normalize(im, image_mean, image_std) for im in elems]
    global_image = [
        torch.nn.functional.interpolate(im.unsqueeze(0).float(), size=(336, 336), mode="bicubic").to(im.dtype)
        for im in hd_images
    ]
    shapes = [[im.size(1), im.size(2)] for im in hd_images]
    num_img_tokens = [int(((h // 336) * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12) for h, w in shapes]
    hd_images_reshape = [
        im.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336).contiguous()
        for im, (h, w) in zip(hd_images, shapes)
    ]
    hd_images_reshape = [
        torch.cat([_global_image] + [_im], dim=0) for _global_image, _im in zip(global_image, hd_images_reshape)
    ]
    image_transformed = [official_pad_to_max_num_crops_tensor(im, num_crops + 1) for im in hd_images_reshape]
    return torch.stack(image_transformed, dim=0), shapes, num_img_tokens


# ---- pixels -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_pixels_equal_the_official_processor(num_crops):
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    official, shapes, tokens = official_preprocess(images, num_crops)
    processor = Phi3VImageProcessor(num_crops=num_crops)
    out = processor(images)
    ours = out["pixel_values"]
    assert len(ours) == len(images)
    for index, (mine, image) in enumerate(zip(ours, images)):
        crops = mine.shape[0]
        assert torch.equal(mine, official[index, :crops]), (image.size, num_crops)
        assert not official[index, crops:].any()  # the rest is the official zero padding
    assert [list(s) for s in out["image_sizes"]] == shapes
    assert out["num_img_tokens"] == tokens


def test_pixels_of_non_rgb_images_follow_the_plain_convert():
    rgba = Image.fromarray((np.random.RandomState(3).rand(70, 90, 4) * 255).astype("uint8"), "RGBA")
    gray = Image.fromarray((np.random.RandomState(4).rand(90, 50) * 255).astype("uint8"), "L")
    official, _, _ = official_preprocess([rgba, gray], 4)
    out = Phi3VImageProcessor(num_crops=4)([rgba, gray])["pixel_values"]
    for index, mine in enumerate(out):
        assert torch.equal(mine, official[index, : mine.shape[0]])


def test_processor_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"num_crops": 16, "image_mean": [0.5, 0.5, 0.5]}')
    processor = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert processor.num_crops == 16 and processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == CLIP_STD
    image = random_image(0, (100, 60))
    official, _, _ = official_preprocess([image], 16, image_mean=[0.5, 0.5, 0.5])
    mine = processor([image])["pixel_values"][0]
    assert torch.equal(mine, official[0, : mine.shape[0]])
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Phi3VImageProcessor.from_pretrained(tmp_path / "missing")


# ---- grid and token count -----------------------------------------------------------------------------------
def test_grid_from_crop_count_inverts_the_hd_transform():
    rng = np.random.RandomState(0)
    sizes = [(int(w), int(h)) for w, h in rng.randint(1, 3000, size=(400, 2))] + SIZES
    for width, height in sizes:
        for num_crops in (1, 2, 4, 9, 16, 25):
            grid = hd_grid_for_num_crops(width, height, num_crops)
            if grid.crops == 0:  # too elongated: the short side resizes to 0 pixels
                continue
            assert 1 <= grid.crops <= num_crops
            assert hd_grid(width, height, grid.crops) == grid, (width, height, num_crops)


def test_grid_matches_the_transformed_image():
    for width, height in SIZES:
        for num_crops in (1, 4, 16):
            canvas = official_hd_transform(random_image(1, (width, height)), num_crops)
            grid = hd_grid_for_num_crops(width, height, num_crops)
            assert (canvas.size[1], canvas.size[0]) == grid.size


def test_token_count_formula():
    for rows in range(1, 5):
        for cols in range(1, 5):
            grid = HDGrid(rows, cols)
            h, w = grid.size
            assert num_image_tokens(grid) == (h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12
            # every crop and the global view: 144; a separator closing each of the 12 * rows + 12 rows; glb_GN
            assert num_image_tokens(grid) == (rows * cols + 1) * 144 + 12 * rows + 12 + 1


def test_bad_sizes_are_named():
    with pytest.raises(Phi3VImageError, match="cannot be cut into 5 crops"):
        hd_grid(120, 90, 5)
    with pytest.raises(Phi3VImageError, match="too elongated"):
        Phi3VImageProcessor(num_crops=16)([Image.new("RGB", (20000, 1))])
    with pytest.raises(Phi3VImageError, match="num_crops"):
        Phi3VImageProcessor(num_crops=0)


def test_scale_loop_matches_numpy_ceil():
    # the official loop uses np.ceil on floats; math.ceil on the same float64 agrees
    for ratio in np.linspace(1.0, 50.0, 997):
        for num_crops in (1, 3, 16):
            scale = 1
            while scale * np.ceil(scale / ratio) <= num_crops:
                scale += 1
            other = 1
            while other * math.ceil(other / ratio) <= num_crops:
                other += 1
            assert scale == other
