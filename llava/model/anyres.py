"""LLaVA-1.6 (anyres) image features: every crop through the tower with stage 1, then the kept tokens laid back
out on the image grid the way ``mm_patch_merge_type`` says.

Upstream reshaped each image's ``[1 + crops, 576, C]`` block into a dense grid. With stage 1 a crop keeps a subset
of its patches, so the grid is sparse here: every kept token carries its (row, column) on the full grid of the
image, and the three merge types become rules over those coordinates:

- ``flat``: base crop, then each grid crop, each in its own raster order (upstream: ``flatten(0, 1)``);
- ``spatial``: base crop, then the grid crops' tokens in row-major order over the whole grid;
- ``spatial_unpad``: as ``spatial``, but tokens in the rows/columns that were black padding are dropped
  (``unpad``), and ``image_newline`` follows the last kept token of every row that keeps at least one token.

With nothing pruned these are exactly upstream's (and transformers' ``LlavaNextForConditionalGeneration``'s)
sequences. docs/llava16.md explains the choices for pruned crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llava.mm_utils import get_anyres_image_grid_shape
from pruning import PruningConfig
from pruning.strategies import apply_strategy, is_keep_rule, scoring_config

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


class AnyresInputError(ValueError):
    """Multi-crop images that do not fit the config (merge type, grid, image sizes); the message says which."""


@dataclass
class CropTokens:
    """Stage-1 result for the crops of one image (crop 0 = base image), features already projected."""

    features: list[torch.Tensor]  # per crop [k_c, hidden], raster order
    indices: list[torch.Tensor]  # per crop [k_c] patch index 0..n-1
    n: int  # patches per crop
    inflection: list[int | None]  # per crop i* (None when the vision-side method computes none)


@dataclass
class AssembledImage:
    features: torch.Tensor  # [length, hidden]: what replaces the image's <image> tag
    full_length: int  # the same sequence's length with nothing pruned
    newlines: int


def merge_type_of(config) -> str:
    merge_type = getattr(config, "mm_patch_merge_type", None) or "flat"
    if merge_type not in MERGE_TYPES:
        raise AnyresInputError(
            f"mm_patch_merge_type {merge_type!r} is not supported; expected one of {', '.join(MERGE_TYPES)}"
        )
    return merge_type


def crops_per_image(images) -> list[torch.Tensor]:
    """A [B, crops, 3, H, W] tensor or a list of [crops, 3, H, W] / [3, H, W] tensors -> one 4-D tensor per image."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 5:
            raise AnyresInputError(f"multi-crop images must be [B, crops, 3, H, W], got {tuple(images.shape)}")
        return list(images)
    out = []
    for index, image in enumerate(images):
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4:
            raise AnyresInputError(f"image {index}: expected [crops, 3, H, W] or [3, H, W], got {tuple(image.shape)}")
        out.append(image)
    return out


def normalise_image_sizes(image_sizes, count: int) -> list[tuple[int, int]]:
    """(width, height) per image, PIL's order as upstream; a tensor [B, 2] or a list of pairs."""
    if image_sizes is None:
        raise AnyresInputError(
            "spatial merge of multi-crop images needs image_sizes (the original (width, height) of each image)"
        )
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    if len(sizes) != count:
        raise AnyresInputError(f"got {len(sizes)} image_sizes for {count} images")
    try:
        pairs = [(int(w), int(h)) for w, h in sizes]
    except (TypeError, ValueError) as err:
        raise AnyresInputError(f"image_sizes must be (width, height) pairs, got {image_sizes!r}") from err
    if any(w <= 0 or h <= 0 for w, h in pairs):
        raise AnyresInputError(f"image_sizes must be positive, got {pairs}")
    return pairs


# ---- stage 1 over crops ------------------------------------------------------------------------------------------
def select_crop_tokens(
    tower,
    projector: nn.Module,
    crops: torch.Tensor,
    counts: Sequence[int],
    pruning: PruningConfig,
    candidates: Sequence[torch.Tensor | None] | None = None,
    texts: Sequence[str] | None = None,
) -> list[CropTokens]:
    """Run all crops of all images through the tower in one batch; return each image's kept, projected tokens.
    ``texts`` (the question per image, for text-guided methods) reach the tower once per crop.

    ``per_crop``: each crop is pruned on its own CLS curve (its own i* and k). ``global``: each crop's rule still
    sets its budget k_c, but the image keeps the sum of the k_c best tokens over all its crops, so salient crops
    take tokens from empty ones. The pooling never crosses images, so a batch gives what single images give.

    ``candidates`` (one [n] bool mask per crop, None = every patch) are the patches that can reach the LLM: under
    ``spatial_unpad`` the padding of the grid crops is cut away, so only the rest compete, and i* is taken on their
    curve. Otherwise a crop could spend its budget on black padding that unpad then throws away.
    """
    if tower.select_feature != "patch":
        raise AnyresInputError(f"multi-crop images need mm_vision_select_feature 'patch', got {tower.select_feature!r}")
    candidates = list(candidates) if candidates is not None else [None] * crops.shape[0]
    if len(candidates) != crops.shape[0]:
        raise ValueError(f"got {len(candidates)} candidate masks for {crops.shape[0]} crops")
    pooled = pruning.crop_budget == "global"
    masked = any(c is not None for c in candidates)
    by_scores = is_keep_rule(pruning.visual_pruning)
    if pooled and pruning.visual_enabled and not by_scores:
        raise AnyresInputError(
            f"crop_budget 'global' pools the CLS-score ranking of a keep rule over an image's crops; visual_pruning "
            f"{pruning.visual_pruning!r} is not a keep rule: use crop_budget 'per_crop'"
        )
    if pruning.visual_enabled and by_scores and (pooled or (masked and pruning.visual_mode == "select")):
        flat_features, flat_indices, kept, inflection = _select_by_scores(
            tower, crops, counts, pruning, candidates, pooled
        )
    else:
        # nothing pruned, or per-crop pruning where no padding must be avoided (or 'inside' mode, or a method that is
        # not a keep rule, which decide inside the tower and so cannot see the padding: unpad drops what they keep of it)
        crop_texts = None if texts is None else [text for text, count in zip(texts, counts) for _ in range(count)]
        out = tower.select(crops, pruning, projector, crop_texts)
        flat_features, flat_indices = out.features[out.mask], out.indices[out.mask]  # [sum k, C], [sum k]
        kept = out.kept.tolist()
        inflection = out.inflection.tolist() if out.inflection is not None else [None] * len(kept)
    projected = projector(flat_features)  # [sum k, hidden]
    features = list(torch.split(projected, kept))
    indices = list(torch.split(flat_indices, kept))
    n = tower.num_patches
    result, start = [], 0
    for count in counts:
        span = slice(start, start + count)
        result.append(CropTokens(features[span], indices[span], n, inflection[span]))
        start += count
    return result


def _select_by_scores(
    tower,
    crops: torch.Tensor,
    counts: Sequence[int],
    pruning: PruningConfig,
    candidates: Sequence[torch.Tensor | None],
    pooled: bool,
):
    """Decide outside the tower: score every patch once, apply the rule to each crop's candidates, pick."""
    if pruning.visual_mode != "select":
        raise AnyresInputError(
            "crop_budget 'global' ranks tokens across crops after scoring them, which needs visual_mode 'select' "
            f"(got {pruning.visual_mode!r})"
        )
    full = tower.select(crops, scoring_config(pruning))  # every patch, raster order, with scores
    generator = tower.random_generator(pruning)  # 'random': one stream, a new draw for every crop and batch
    num_crops, n = full.scores.shape
    device = full.scores.device
    chosen = torch.zeros(num_crops * n, dtype=torch.bool, device=device)  # crop-major flat positions
    inflection: list[int] = []
    start = 0
    for count in counts:
        rankings, positions, budget = [], [], 0
        for crop in range(start, start + count):
            mask = candidates[crop]
            where = torch.arange(n, device=device) if mask is None else torch.nonzero(mask.to(device)).flatten()
            if where.numel() == 0:  # an image so thin that unpad leaves nothing of this crop
                inflection.append(0)
                continue
            decision = apply_strategy(full.scores[crop, where][None], pruning, generator)
            keep = int(decision.keep[0])
            inflection.append(int(decision.inflection[0]))
            if pooled:
                rankings.append(decision.ranking[0])
                positions.append(crop * n + where)
                budget += keep
            else:
                best = torch.sort(decision.ranking[0], descending=True, stable=True).indices[:keep]
                chosen[crop * n + where[best]] = True
        if pooled and positions:
            best = torch.sort(torch.cat(rankings), descending=True, stable=True).indices[:budget]
            chosen[torch.cat(positions)[best]] = True
        start += count
    chosen = chosen.view(num_crops, n)
    patch = torch.arange(n, device=device).expand(num_crops, n)
    return full.features[chosen], patch[chosen], chosen.sum(dim=1).tolist(), inflection


def crop_candidates(grid: tuple[int, int], side: int, image_size: tuple[int, int]) -> list[torch.Tensor | None]:
    """Per grid crop, the [side * side] mask of patches inside the unpad window (None where a crop has no padding)."""
    cols, rows = grid
    row0, row1, col0, col1 = unpad_window(rows * side, cols * side, image_size)
    y = torch.arange(side).repeat_interleave(side)  # patch row within the crop, raster order
    x = torch.arange(side).repeat(side)
    masks: list[torch.Tensor | None] = []
    for crop in range(cols * rows):
        row = (crop // cols) * side + y
        col = (crop % cols) * side + x
        mask = (row >= row0) & (row < row1) & (col >= col0) & (col < col1)
        masks.append(None if bool(mask.all()) else mask)
    return masks


# ---- layout --------------------------------------------------------------------------------------------------------
def unpad_window(grid_height: int, grid_width: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of a [grid_height, grid_width] token grid that hold the image, not the padding.

    Upstream's unpad_image, in exact integer arithmetic: upstream's float ``int(h * scale)`` can land one below
    an exact integer; transformers rounds first. Both agree with this on every size where floats are exact.
    """
    width, height = image_size
    if width * grid_height > grid_width * height:  # wider than the grid: padding above and below
        new_height = height * grid_width // width
        pad = (grid_height - new_height) // 2
        return pad, grid_height - pad, 0, grid_width
    new_width = width * grid_height // height
    pad = (grid_width - new_width) // 2
    return 0, grid_height, pad, grid_width - pad


def assemble_image(
    tokens: CropTokens,
    merge_type: str,
    side: int,
    grid: tuple[int, int] | None,
    image_size: tuple[int, int] | None,
    newline: torch.Tensor | None,
) -> AssembledImage:
    """One image's token sequence from its kept crop tokens. ``grid`` = (crops across, crops down)."""
    base = tokens.features[0]
    n = tokens.n
    if merge_type == "flat":
        return AssembledImage(torch.cat(tokens.features), n * len(tokens.features), 0)
    unpad = merge_type == "spatial_unpad"
    if len(tokens.features) == 1:
        if not unpad:
            return AssembledImage(base, n, 0)
        return AssembledImage(torch.cat([base, newline[None].to(base.dtype)]), n + 1, 1)
    cols, rows = grid
    height, width = rows * side, cols * side
    grid_features = torch.cat(tokens.features[1:])  # [K, hidden]
    patch = torch.cat(tokens.indices[1:]).to(base.device)
    crop = torch.cat([torch.full_like(idx, c, device=base.device) for c, idx in enumerate(tokens.indices[1:])])
    row = (crop // cols) * side + patch // side
    col = (crop % cols) * side + patch % side
    if not unpad:
        order = torch.argsort(row * width + col)
        return AssembledImage(torch.cat([base, grid_features[order]]), n * len(tokens.features), 0)

    row0, row1, col0, col1 = unpad_window(height, width, image_size)
    inside = (row >= row0) & (row < row1) & (col >= col0) & (col < col1)
    row, col, grid_features = row[inside], col[inside], grid_features[inside]
    order = torch.argsort(row * width + col)
    row, grid_features = row[order], grid_features[order]
    # a newline after the last kept token of each non-empty row: gather from [tokens; newline]
    count = row.shape[0]
    row_end = torch.ones(count, dtype=torch.bool, device=row.device)
    row_end[:-1] = row[1:] != row[:-1]
    newlines = int(row_end.sum())
    token_slot = torch.arange(count, device=row.device) + torch.cumsum(row_end.long(), 0) - row_end.long()
    source = torch.full((count + newlines,), count, dtype=torch.long, device=row.device)
    source[token_slot] = torch.arange(count, device=row.device)
    body = torch.cat([grid_features, newline[None].to(grid_features.dtype)])[source]
    full_length = n + (row1 - row0) * (col1 - col0) + (row1 - row0)
    return AssembledImage(torch.cat([base, body]), full_length, newlines)


def image_grid(config, image_size: tuple[int, int], crop_pixels: int, num_crops: int, index: int) -> tuple[int, int]:
    """(crops across, crops down) for one image, checked against the crops actually given."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if pinpoints is None:
        raise AnyresInputError(
            "mm_patch_merge_type 'spatial*' with multi-crop images needs image_grid_pinpoints in the model config"
        )
    cols, rows = get_anyres_image_grid_shape(image_size, pinpoints, crop_pixels)
    if cols * rows != num_crops - 1:
        raise AnyresInputError(
            f"image {index}: size {image_size} maps to a {cols}x{rows} crop grid (+1 base crop = {cols * rows + 1}), "
            f"but {num_crops} crops were given; were image_sizes and images passed in the same order?"
        )
    return cols, rows
