"""InternVL2's dynamic tiling with pillow + torch: the pixels of the official torchvision-based ``load_image``.

The official pipeline (OpenGVLab/InternVL ``internvl/train/dataset.py``: ``dynamic_preprocess`` and
``build_transform``; the same code in the model card's ``load_image``):

1. choose a grid (cols, rows) with min_num <= cols * rows <= max_num whose aspect ratio is closest to the image's
   (``find_closest_aspect_ratio``; on a tie, the larger grid wins if the image has more than half its pixels);
2. resize the image to (cols * S, rows * S) with pillow's default filter (bicubic) and cut it into S x S tiles in
   row-major order; add an S x S thumbnail of the whole image when there is more than one tile;
3. per tile: torchvision's ``Resize((S, S), BICUBIC)`` (on a PIL image that is pillow's resize, a copy at the same
   size), ``ToTensor`` (uint8 / 255 in fp32) and ``Normalize`` (ImageNet mean / std).

Steps 2 and 3 are pillow and a few tensor operations, reproduced here operation for operation, so the tensors are
bit-identical without torchvision (tests/test_internvl2_preprocessing.py checks them against a transcription of the
official code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from llava.model.internvl.configuration_internvl_chat import IMAGENET_MEAN, IMAGENET_STD

Grid = tuple[int, int]  # (columns, rows)


def candidate_grids(min_num: int, max_num: int) -> list[Grid]:
    """Every (cols, rows) with min_num <= cols * rows <= max_num, by tile count.

    The official code sorts a Python set, and the set's iteration order decides between grids of equal count; the
    same set is built here so ties go the same way.
    """
    if not 1 <= min_num <= max_num:
        raise ValueError(f"tile counts need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(width: int, height: int, grids: Sequence[Grid], tile_size: int) -> Grid:
    """The grid whose aspect ratio is nearest the image's; on an exact tie, the later (larger) grid when the image has
    more than half the pixels that grid would hold. (1, 1) when nothing is nearer than infinity."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def tile_image(
    image: Image.Image, tile_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """The official ``dynamic_preprocess``: the grid's tiles in row-major order, then the thumbnail (if any)."""
    width, height = image.size
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size))  # pillow's default filter, as the official code
    tiles = [
        resized.crop((col * tile_size, row * tile_size, (col + 1) * tile_size, (row + 1) * tile_size))
        for row in range(rows)
        for col in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile_size, tile_size)))
    return tiles


def tile_to_tensor(tile: Image.Image, tile_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision's Resize((S, S), BICUBIC) + ToTensor + Normalize on one PIL tile, with the same operations."""
    if tile.mode != "RGB":
        tile = tile.convert("RGB")
    if tile.size != (tile_size, tile_size):
        tile = tile.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(tile, copy=True)).permute(2, 0, 1).contiguous()  # [3, S, S] uint8
    pixels = pixels.to(dtype=torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


@dataclass
class InternVLImageProcessor:
    """Images -> one ``[tiles, 3, S, S]`` tensor per image (tiles differ between images, so a list).

    Called like a transformers image processor (``processor(images, return_tensors="pt")["pixel_values"]``), which
    is how ``llava.mm_utils.process_images`` and every runner use it.
    """

    tile_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    dynamic: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_model_config(cls, config) -> InternVLImageProcessor:
        """The settings of a checkpoint's config.json (force_image_size, min/max_dynamic_patch, use_thumbnail,
        dynamic_image_size)."""
        return cls(
            tile_size=config.tile_size,
            min_num=config.min_dynamic_patch,
            max_num=config.max_dynamic_patch,
            use_thumbnail=config.use_thumbnail,
            dynamic=config.dynamic_image_size,
        )

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        if not self.dynamic:
            return [image]
        return tile_image(image, self.tile_size, self.min_num, self.max_num, self.use_thumbnail)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """[tiles, 3, S, S] for one image."""
        return torch.stack(
            [tile_to_tensor(t, self.tile_size, self.image_mean, self.image_std) for t in self.tiles(image)]
        )

    def __call__(self, images: Image.Image | Sequence[Image.Image], return_tensors: str | None = "pt") -> dict:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"InternVLImageProcessor returns torch tensors; return_tensors={return_tensors!r}")
        if isinstance(images, Image.Image):
            images = [images]
        return {"pixel_values": [self.preprocess(image) for image in images]}
