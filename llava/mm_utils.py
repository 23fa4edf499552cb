"""Prompt ids with image slots, image loading and preprocessing, stopping on keywords (upstream LLaVA's mm_utils).

Pixels: upstream LLaVA preprocessed with transformers 4.37's `CLIPImageProcessor` (numpy + pillow). transformers 5
builds every image processor on torchvision whenever torchvision is importable, and its resize rounds differently
(up to 0.03 after normalisation), so `load_image_processor` pins the pillow backend, whose pixels equal 4.37's bit
for bit; `backend="torchvision"` is there for speed and is not upstream-exact (docs/method.md).
"""

from __future__ import annotations

import ast
import base64
import binascii
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, PreTrainedTokenizerBase, StoppingCriteria
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import is_torchvision_available

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

Resolution = tuple[int, int]  # (width, height), PIL's order

# "pil": numpy + pillow, upstream's pixels (the default); "torchvision": transformers' faster backend, not exact.
IMAGE_PROCESSOR_BACKENDS = ("pil", "torchvision")
DEFAULT_IMAGE_PROCESSOR_BACKEND = "pil"


def tokenizer_image_token(
    prompt: str,
    tokenizer: PreTrainedTokenizerBase,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids of a prompt with `image_token_index` where each `<image>` stood.

    Each chunk between images is tokenised on its own, as upstream did; this is what gives the `▁` (29871 for Llama)
    on both sides of the image slot in `"USER: <image>\\nWhat"`. The tokenizer's BOS is kept once, at the front.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    # When the tokenizer adds BOS, every chunk starts with it: keep the first one, drop it from every chunk.
    adds_bos = bool(chunks[0]) and bos is not None and chunks[0][0] == bos
    ids: list[int] = [bos] if adds_bos else []
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(image_token_index)
        ids.extend(chunk[1:] if adds_bos else chunk)
    if return_tensors is None:
        return ids
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")


class ImageLoadError(ValueError):
    """An image that cannot be read (a URL, or a file pillow cannot open); the message names it."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """An image file that does not exist; the message names it."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a local image as RGB, failing with the path in the message (no downloads: this code runs offline)."""
    text = str(path)
    if text.startswith(("http://", "https://")):
        raise ImageLoadError(f"load_image reads local files only; download {text!r} first and pass its path")
    file = Path(text)
    if not file.is_file():
        raise ImageNotFoundError(f"image file not found: {text!r}")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(f"cannot read image {text!r}: {err}") from err


def load_image_from_base64(data: str) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image is not valid base64: {err}") from err
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"base64 data is not a readable image: {err}") from err


def check_image_processor_backend(backend: str | None, source: str = "backend") -> str:
    """The backend name to use (None means the default, 'pil'); anything else unknown is an error naming `source`."""
    if backend is None:
        return DEFAULT_IMAGE_PROCESSOR_BACKEND
    if backend not in IMAGE_PROCESSOR_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(IMAGE_PROCESSOR_BACKENDS)}, got {backend!r}")
    return backend


def load_image_processor(path: str | os.PathLike, backend: str | None = None) -> BaseImageProcessor:
    """A vision tower's image processor on an explicit backend: 'pil' (default, upstream's pixels) or 'torchvision'.

    Every tower builds its processor here, so the backend never depends on whether torchvision happens to be
    installed. transformers falls back to the other backend, with only a warning, when the one asked for is missing
    or the model family has no class for it; here that is an error instead.
    """
    backend = check_image_processor_backend(backend)
    if backend == "torchvision" and not is_torchvision_available():
        raise ImportError(
            "image processor backend 'torchvision' needs torchvision, which is not installed; install the torchvision "
            "release that matches your torch (from the same index as torch), or use backend 'pil'"
        )
    processor = AutoImageProcessor.from_pretrained(path, backend=backend)
    found = getattr(processor, "backend", None)
    if found != backend:
        raise ValueError(
            f"{type(processor).__name__} from {str(path)!r} runs on the {found!r} backend, not {backend!r}: "
            f"transformers has no {backend} image processor for this model family"
        )
    return processor


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad the short side so the whole image survives CLIP's center crop ('pad' aspect ratio of LLaVA-1.5)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Sequence[int]]) -> Resolution:
    """The grid resolution that keeps the most original pixels; among equals, the one that wastes the least."""
    original_width, original_height = original_size
    best: Resolution | None = None
    best_effective, best_wasted = -1, math.inf
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(width), int(height)), effective, wasted
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Fit inside the target keeping the aspect ratio, centred on black."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Row-major crops of `patch_size` squares (the order the model's grid reshape expects)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def parse_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]]) -> list[Resolution]:
    """Pinpoints come from config.json either as a list or as its string form."""
    points = ast.literal_eval(grid_pinpoints) if isinstance(grid_pinpoints, str) else grid_pinpoints
    try:
        parsed = [(int(w), int(h)) for w, h in points]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"image_grid_pinpoints must be a list of [width, height] pairs, got {grid_pinpoints!r}"
        ) from err
    if not parsed:
        raise ValueError("image_grid_pinpoints is empty")
    return parsed


def get_anyres_image_grid_shape(
    image_size: Resolution, grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """(crops across, crops down) for an image of `image_size` = (width, height)."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def process_anyres_image(
    image: Image.Image, processor: Any, grid_pinpoints: str | Sequence[Sequence[int]]
) -> torch.Tensor:
    """[1 + crops, 3, H, W]: the whole image squashed to one crop, then the grid crops in row-major order."""
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints))
    padded = resize_and_pad_image(image, best)
    patches = divide_to_patches(padded, _crop_height(processor))
    side = _shortest_edge(processor)
    overview = image.resize((side, side), Image.Resampling.BICUBIC)
    return torch.stack([_preprocess_one(processor, crop) for crop in [overview, *patches]], dim=0)


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Pixel values for the vision tower, following the checkpoint's `image_aspect_ratio`.

    'pad' squares each image with the processor's mean colour before the usual resize + crop (LLaVA-1.5);
    'anyres' builds the crop stack of LLaVA-1.6; anything else is the processor's own resize + center crop.
    Returns one stacked tensor when all shapes agree, otherwise the list (anyres images with different grids).
    Build `image_processor` with `load_image_processor` for upstream's pixels; a torchvision-backed one gets a warning.
    """
    if getattr(image_processor, "backend", None) == "torchvision":
        warnings.warn(
            f"{type(image_processor).__name__} runs on transformers' torchvision backend, whose pixels differ from "
            "upstream LLaVA's (up to 0.03 after normalisation); llava.mm_utils.load_image_processor(path) gives the "
            "pillow backend, which matches them exactly",
            UserWarning,
            stacklevel=2,
        )
    aspect_ratio = _cfg_get(model_cfg, "image_aspect_ratio")
    if aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        tensors = [_preprocess_one(image_processor, expand2square(image, background)) for image in images]
    elif aspect_ratio == "anyres":
        pinpoints = _cfg_get(model_cfg, "image_grid_pinpoints")
        if pinpoints is None:
            raise ValueError("image_aspect_ratio is 'anyres' but the model config has no image_grid_pinpoints")
        tensors = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    else:
        return image_processor(list(images), return_tensors="pt")["pixel_values"]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors, dim=0)
    return tensors


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop each sequence once its generated text ends with (or contains, near the end) one of the keywords.

    Returns one flag per sample, so generation ends a finished sample while the others continue. Pass the prompt
    `input_ids` when the ids generate() hands over start with the prompt; leave it None when they hold only new
    tokens (LLaVA generates from inputs_embeds), so prompt text can never trigger a stop.
    """

    def __init__(
        self, keywords: Sequence[str], tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor | None = None
    ) -> None:
        if not keywords:
            raise ValueError("KeywordsStoppingCriteria needs at least one keyword")
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids: list[torch.Tensor] = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.max_keyword_len = max(len(ids) for ids in self.keyword_ids)
        self.start_len = 0 if input_ids is None else int(input_ids.shape[-1])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.start_len :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if generated.shape[1] == 0:
            return done
        for row in range(generated.shape[0]):
            done[row] = self._sample_done(generated[row])
        return done

    def _sample_done(self, generated: torch.Tensor) -> bool:
        for ids in self.keyword_ids:
            if generated.shape[0] >= ids.shape[0] and torch.equal(generated[-ids.shape[0] :].cpu(), ids):
                return True
        tail = self.tokenizer.decode(generated[-self.max_keyword_len :].tolist(), skip_special_tokens=True)
        return any(keyword in tail for keyword in self.keywords)


def get_model_name_from_path(model_path: str | os.PathLike) -> str:
    """Last path component; for a `checkpoint-N` folder, `<run>_checkpoint-N` so runs stay distinguishable."""
    parts = [p for p in str(model_path).strip("/").split("/") if p]
    if not parts:
        raise ValueError(f"cannot derive a model name from {str(model_path)!r}")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def _preprocess_one(processor: Any, image: Image.Image) -> torch.Tensor:
    return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def _cfg_get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _crop_height(processor: Any) -> int:
    return int(processor.crop_size["height"])


def _shortest_edge(processor: Any) -> int:
    return int(processor.size["shortest_edge"])
