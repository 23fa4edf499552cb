"""Phi-3-vision's image preprocessing (``image_processing_phi3_v.py`` of the release) with pillow + torch only.

The official ``Phi3VImageProcessor`` (num_crops from ``preprocessor_config.json``, 16 in the release):

1. ``HD_transform``: an image taller than wide is transposed; the largest ``scale`` with
   ``scale * ceil(scale / ratio) <= num_crops`` sets the width ``scale * 336``; the height follows the aspect ratio;
   the image is resized (torchvision's ``resize`` of a PIL image, i.e. PIL bilinear), padded with white to a
   multiple of 336 (top and bottom, the extra row at the bottom) and transposed back;
2. ``ToTensor`` + ``Normalize`` with CLIP's mean and std;
3. the global view: the normalised HD image resized to 336 x 336 by torch's bicubic interpolation (no antialias);
4. the HD image cut into 336-pixel crops, row-major; the global view first.

torchvision is not needed for any of it: its PIL path calls ``Image.resize((w, h), BILINEAR)`` and
``ImageOps.expand``; the tensor steps are plain torch. ``tests/test_phi3v_preprocessing.py`` checks the pixels
against a line-by-line transcription of the official code.

We return one ``[1 + crops, 3, 336, 336]`` tensor per image, without the official zero crops that pad every image
to ``num_crops + 1`` (the model never looks at them). The model finds the crop grid again from the image's
original (width, height) and its crop count (``hd_grid``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
CROP = 336


class Phi3VImageError(ValueError):
    """An image (or image size, or crop stack) that does not fit Phi-3-vision's HD transform; the message says which."""


@dataclass(frozen=True)
class HDGrid:
    """The crop grid of one image after the HD transform: ``rows`` x ``cols`` crops of ``crop`` pixels."""

    rows: int
    cols: int
    crop: int = CROP

    @property
    def crops(self) -> int:
        return self.rows * self.cols

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the padded HD image: the official ``image_sizes`` entry."""
        return self.rows * self.crop, self.cols * self.crop


def _scale(ratio: float, num_crops: int) -> int:
    """The official loop: the largest scale with scale * ceil(scale / ratio) <= num_crops (at least 1)."""
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1  # >= 1: the ratio (long side / short side) is >= 1, so scale 1 always fits


def _grid_for_scale(width: int, height: int, scale: int, crop: int) -> HDGrid:
    """The padded crop grid when the long side (width after the transpose) becomes ``scale`` crops."""
    wide, narrow = (width, height) if width >= height else (height, width)
    ratio = wide / narrow
    new_wide = int(scale * crop)
    new_narrow = int(new_wide / ratio)
    narrow_crops = int(np.ceil(new_narrow / crop))
    return HDGrid(narrow_crops, scale, crop) if width >= height else HDGrid(scale, narrow_crops, crop)


def hd_grid_for_num_crops(width: int, height: int, num_crops: int, crop: int = CROP) -> HDGrid:
    """The grid the official HD_transform makes of a (width, height) image with ``num_crops``."""
    _check_size(width, height)
    wide, narrow = (width, height) if width >= height else (height, width)
    return _grid_for_scale(width, height, _scale(wide / narrow, num_crops), crop)


def hd_grid(width: int, height: int, crops: int, crop: int = CROP) -> HDGrid:
    """The grid of an image of original (width, height) cut into ``crops`` sub-crops (global view not counted).

    The crop count grows strictly with the scale for a fixed aspect ratio, so the count alone fixes the grid,
    whatever ``num_crops`` the processor used.
    """
    _check_size(width, height)
    for scale in range(1, crops + 1):
        grid = _grid_for_scale(width, height, scale, crop)
        if grid.crops == crops:
            return grid
        if grid.crops > crops:
            break
    raise Phi3VImageError(
        f"an image of {width} x {height} pixels cannot be cut into {crops} crops by Phi-3-vision's HD transform; "
        "were image_sizes given as the original (width, height) of each image, in the order of the images?"
    )


def num_image_tokens(grid: HDGrid, merged_side: int = 12) -> int:
    """Tokens of one image: the official ``(h/336 * w/336 + 1) * 144 + 1 + (h/336 + 1) * 12`` (with a 24 x 24 patch
    grid per crop merged 2 x 2: ``merged_side`` = 12): every crop and the global view give 144 tokens, each row of
    the sub-image grid and of the global view ends with a separator, and one separator sits between them."""
    return (grid.crops + 1) * merged_side**2 + 1 + (grid.rows + 1) * merged_side


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise Phi3VImageError(f"image size must be positive, got {width} x {height}")


def hd_transform(image: Image.Image, num_crops: int, crop: int = CROP) -> Image.Image:
    """The official HD_transform: transpose portrait images, resize (PIL bilinear), pad white to a multiple of
    ``crop`` (top and bottom), transpose back."""
    width, height = image.size
    _check_size(width, height)
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    new_width = int(_scale(ratio, num_crops) * crop)
    new_height = int(new_width / ratio)
    if new_height < 1:
        raise Phi3VImageError(
            f"an image of {image.size[0]} x {image.size[1]} pixels is too elongated for the HD transform with "
            f"num_crops {num_crops}: its short side would be resized to 0 pixels"
        )
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_height / crop) * crop)
    top = int((target - new_height) / 2)
    canvas = Image.new("RGB", (new_width, target), (255, 255, 255))
    canvas.paste(resized, (0, top))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def to_normalized_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """ToTensor + Normalize: uint8 HWC -> float32 CHW in [0, 1], then (x - mean) / std, in that order."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return tensor.sub(mean_t).div(std_t)


def crops_of(hd_image: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """[3, H, W] normalised HD image -> [1 + H/crop * W/crop, 3, crop, crop]: the global view, then the crops
    row-major."""
    channels, height, width = hd_image.shape
    rows, cols = height // crop, width // crop
    if rows * crop != height or cols * crop != width:
        raise Phi3VImageError(f"HD image {height} x {width} is not a multiple of {crop}")
    global_view = F.interpolate(hd_image[None].float(), size=(crop, crop), mode="bicubic").to(hd_image.dtype)
    grid = hd_image.reshape(channels, rows, crop, cols, crop).permute(1, 3, 0, 2, 4).reshape(-1, channels, crop, crop)
    return torch.cat([global_view, grid], dim=0)


class Phi3VImageProcessor:
    """Pixels as the official processor makes them; ``__call__`` fits ``llava.mm_utils.process_images``.

    ``crop_size`` and ``merged_side`` (merged tokens per crop side) come from the model's tower: 336 and 12 for the
    release's ViT-L/14-336.
    """

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        do_convert_rgb: bool = True,
        crop_size: int = CROP,
        merged_side: int = 12,
    ) -> None:
        if not isinstance(num_crops, int) or num_crops < 1:
            raise Phi3VImageError(f"num_crops must be an integer >= 1, got {num_crops!r}")
        self.num_crops = num_crops
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.do_convert_rgb = do_convert_rgb
        self.crop_size = crop_size
        self.merged_side = merged_side

    @classmethod
    def from_pretrained(cls, folder: str | Path, crop_size: int = CROP, merged_side: int = 12) -> Phi3VImageProcessor:
        """Read ``preprocessor_config.json``; the official class defaults (num_crops 1, CLIP mean/std) fill gaps."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"Phi-3-vision checkpoint {folder} has no {PREPROCESSOR_FILE} (num_crops, mean, std)"
            )
        try:
            settings = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise Phi3VImageError(f"{path}: not valid JSON ({err.msg})") from None
        return cls(
            num_crops=settings.get("num_crops", 1),
            image_mean=settings.get("image_mean", CLIP_MEAN),
            image_std=settings.get("image_std", CLIP_STD),
            do_convert_rgb=settings.get("do_convert_rgb", True),
            crop_size=crop_size,
            merged_side=merged_side,
        )

    def grid(self, image: Image.Image) -> HDGrid:
        return hd_grid_for_num_crops(*image.size, self.num_crops, self.crop_size)

    def num_image_tokens(self, image: Image.Image) -> int:
        return num_image_tokens(self.grid(image), self.merged_side)

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """[1 + crops, 3, crop, crop] for one PIL image."""
        # The official code converts to RGB whatever do_convert_rgb says; its transformers 4.38 convert_to_rgb was the
        # same plain convert (no compositing of transparent pixels on white).
        hd_image = hd_transform(image.convert("RGB"), self.num_crops, self.crop_size)
        return crops_of(to_normalized_tensor(hd_image, self.image_mean, self.image_std), self.crop_size)

    def __call__(self, images: list[Image.Image] | Image.Image, return_tensors: str | None = "pt") -> dict[str, Any]:
        """``pixel_values``: one [1 + crops, 3, crop, crop] tensor per image (stacked when all agree), plus each
        image's HD ``image_sizes`` (height, width) and ``num_img_tokens``, as the official processor reports them."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (or None), got {return_tensors!r}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        tensors = [self.preprocess_one(image) for image in images]
        grids = [self.grid(image) for image in images]
        for tensor, grid, image in zip(tensors, grids, images):
            if tensor.shape[0] != grid.crops + 1:  # the size arithmetic and the transform must agree
                raise Phi3VImageError(f"image of size {image.size}: {tensor.shape[0] - 1} crops, expected {grid.crops}")
        same = bool(tensors) and all(t.shape == tensors[0].shape for t in tensors)
        return {
            "pixel_values": torch.stack(tensors) if same else tensors,
            "image_sizes": [grid.size for grid in grids],
            "num_img_tokens": [num_image_tokens(grid, self.merged_side) for grid in grids],
        }

    preprocess = __call__
