"""InternVL2's visual tokens: InternViT per tile, 2x2 pixel shuffle, stage 1 on the merged tokens.

Every tile (the grid tiles and the thumbnail) goes through the tower on its own, like a LLaVA-1.6 crop. The LLM
sees one token per 2x2 block of patches (pixel shuffle v2 with downsample_ratio 0.5: 1024 patches -> 256 tokens for
a 448 tile), so stage 1 keeps or drops merged tokens whole:

- the CLS row at ``visual_layer`` scores the P patches (``pruning.cls_patch_scores``, paper eq. 1, over the
  layer's fused qkv);
- a merged token's score is the **sum** of its patches' scores (docs/method.md, "Merged tokens (InternVL2)"): the
  scores are the CLS query's attention mass, and the mass on a group of keys is the sum of its members' mass, so the
  merged scores are again a distribution, over exactly the units that reach the LLM;
- the keep rule (``pruning.apply_strategy``: i* and k, top-k, ratio, random, ...) runs on the n = P / 4 merged scores
  of each tile; the kept tokens stay in raster order.

``visual_mode='select'`` runs the whole tower and gathers the kept merged tokens after the pixel shuffle.
``visual_mode='inside'`` runs the layers after ``visual_layer`` on CLS + the four patches of each kept token only.
``crop_budget='global'`` pools one image's budget over its tiles (the sum of the tiles' k, spent on the best tokens
of any tile), as LLaVA-1.6's pooled crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llava.model.internvl.modeling_intern_vit import InternVisionModel
from pruning import PruningConfig, apply_strategy, cls_patch_scores, raster_order_indices
from pruning.packing import PACK_MULTIPLE, PackedLayout
from pruning.strategies import is_keep_rule
from pruning.visual import with_cls


@dataclass
class TileTokens:
    """Kept merged tokens of a batch of tiles, one row per tile, zero-padded at the end."""

    features: torch.Tensor  # [T, k_max, m*m*C] pixel-shuffled tower features (before mlp1), raster order
    mask: torch.Tensor  # [T, k_max] bool, True on kept tokens
    indices: torch.Tensor  # [T, k_max] merged-token index 0..n-1, -1 on padding
    n: int  # merged tokens per tile
    kept: torch.Tensor  # [T] int64
    inflection: torch.Tensor | None  # [T] int64, i* of the merged scores (None with pruning off: nothing scored)
    scores: torch.Tensor | None  # [T, n] fp32 merged scores (None with pruning off)


def pixel_shuffle(features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """The official pixel shuffle v2: [B, h, w, C] -> [B, h*s, w*s, C/s^2] (s = scale_factor), the same views and
    permutes, so that channels come out in the released projector's order."""
    batch, width, height, channels = features.shape
    x = features.reshape(batch, width, int(height * scale_factor), int(channels / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(batch, int(height * scale_factor), int(width * scale_factor), int(channels / scale_factor**2))
    return x.permute(0, 2, 1, 3).contiguous()


def merge_groups(side: int, factor: int, device: torch.device | None = None) -> torch.Tensor:
    """[n, factor^2] patch indices of each merged token (raster order over the (side/factor)^2 grid); each row lists
    its block's patches in the order pixel_shuffle concatenates their channels (row-major inside the block)."""
    if side % factor:
        raise ValueError(f"a {side}x{side} patch grid cannot be merged in {factor}x{factor} blocks")
    merged = side // factor
    block_row = torch.arange(merged, device=device).repeat_interleave(merged)  # merged token -> block row
    block_col = torch.arange(merged, device=device).repeat(merged)
    inner_row = torch.arange(factor, device=device).repeat_interleave(factor)  # position inside the block
    inner_col = torch.arange(factor, device=device).repeat(factor)
    rows = block_row[:, None] * factor + inner_row[None, :]
    cols = block_col[:, None] * factor + inner_col[None, :]
    return rows * side + cols


def merged_scores(patch_scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[T, P] patch scores -> [T, n]: each merged token's score is the sum over its patches."""
    return patch_scores[:, groups].sum(dim=-1)


def select_tile_tokens(
    vision_model: InternVisionModel,
    pixel_values: torch.Tensor,
    pruning: PruningConfig,
    select_layer: int,
    downsample_ratio: float,
    tiles_per_image: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> TileTokens:
    """Run the tower on tiles [T, 3, S, S] and return each tile's kept merged tokens (features before ``mlp1``).

    ``tiles_per_image`` (consecutive tiles per image) is needed only by ``crop_budget='global'``. With pruning off
    the features are the official ``extract_feature``'s before ``mlp1``, every token kept.
    """
    if not pruning.visual_enabled:
        return _plain_tile_tokens(vision_model, pixel_values, select_layer, downsample_ratio)
    if not is_keep_rule(pruning.visual_pruning):
        raise ValueError(
            f"--visual-pruning {pruning.visual_pruning} is not available on InternVL2: only the CLS-score keep rules "
            "carry over to its 2x2-merged tokens (docs/models.md, 'InternVL2-1B')"
        )
    layers = vision_model.encoder.layers
    num_layers = len(layers)
    select_index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer  # hidden_states index
    if not 1 <= select_index <= num_layers:
        raise ValueError(f"select_layer {select_layer} names no layer of a {num_layers}-layer InternViT")
    visual_layer = pruning.visual_layer
    if visual_layer >= num_layers:
        raise ValueError(
            f"visual_layer {visual_layer} needs encoder.layers[{visual_layer}], but InternViT has {num_layers} layers "
            f"(valid: 0..{num_layers - 1})"
        )
    if pruning.visual_mode == "inside" and visual_layer > select_index:
        raise ValueError(
            f"visual_mode 'inside' prunes at hidden_states[{visual_layer}], after the select layer "
            f"hidden_states[{select_index}]; use a visual_layer <= {select_index} or visual_mode 'select'"
        )

    hidden = vision_model.embeddings(pixel_values)  # hidden_states[0], [T, 1+P, C]
    patches = hidden.shape[1] - 1
    side = round(patches**0.5)
    factor = round(1 / downsample_ratio)
    groups = merge_groups(side, factor, hidden.device)  # [n, factor^2]
    selected = None
    for index, layer in enumerate(layers[:visual_layer], start=1):
        hidden = layer(hidden)
        if index == select_index:
            selected = hidden
    patch_scores = cls_patch_scores(layers[visual_layer].scoring_view(), hidden, mode=pruning.visual_score)
    scores = merged_scores(patch_scores, groups)  # [T, n]
    decision = apply_strategy(scores, pruning, generator=generator)
    if pruning.crop_budget == "global" and pruning.visual_enabled and tiles_per_image is not None:
        chosen = _pooled_choice(decision.ranking, decision.keep, tiles_per_image)
        indices, mask = _raster_indices(chosen)
    else:
        indices, mask = raster_order_indices(decision.ranking, decision.keep)  # [T, k_max]
    kept = mask.sum(dim=1)

    if pruning.visual_mode == "inside":
        features = _run_inside(layers[visual_layer:select_index], hidden, groups, indices, mask)
    else:
        if selected is None:
            for layer in layers[visual_layer:select_index]:
                hidden = layer(hidden)
            selected = hidden
        grid = selected[:, 1:].reshape(selected.shape[0], side, side, -1)
        shuffled = pixel_shuffle(grid, downsample_ratio)
        shuffled = shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])  # [T, n, m*m*C]
        features = _gather(shuffled, indices, mask)
    return TileTokens(
        features=features,
        mask=mask,
        indices=indices,
        n=groups.shape[0],
        kept=kept,
        inflection=decision.inflection,
        scores=scores,
    )


def _plain_tile_tokens(
    vision_model: InternVisionModel, pixel_values: torch.Tensor, select_layer: int, downsample_ratio: float
) -> TileTokens:
    """Pruning off: the official ``extract_feature`` path (layers up to the select layer, pixel shuffle), no layer
    scored and so no ``visual_layer`` needed, every merged token kept, no i*."""
    layers = vision_model.encoder.layers
    select_index = select_layer if select_layer >= 0 else len(layers) + 1 + select_layer
    if not 1 <= select_index <= len(layers):
        raise ValueError(f"select_layer {select_layer} names no layer of a {len(layers)}-layer InternViT")
    hidden = vision_model.embeddings(pixel_values)
    for layer in layers[:select_index]:
        hidden = layer(hidden)
    side = round((hidden.shape[1] - 1) ** 0.5)
    shuffled = pixel_shuffle(hidden[:, 1:].reshape(hidden.shape[0], side, side, -1), downsample_ratio)
    features = shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])  # [T, n, m*m*C]
    tiles, n = features.shape[:2]
    return TileTokens(
        features=features,
        mask=torch.ones(tiles, n, dtype=torch.bool, device=features.device),
        indices=torch.arange(n, device=features.device).expand(tiles, n),
        n=n,
        kept=torch.full((tiles,), n, dtype=torch.long, device=features.device),
        inflection=None,
        scores=None,
    )


def _gather(tokens: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens [T, n, D] -> [T, k_max, D] at ``indices``, zeros on padding."""
    gathered = torch.gather(tokens, 1, indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.where(mask.unsqueeze(-1), gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))


def _run_inside(
    layers: Sequence[nn.Module], hidden: torch.Tensor, groups: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The layers after visual_layer on CLS + the patches of the kept merged tokens only; returns [T, k_max, m*m*C].

    The patches of kept token t sit at rows 1 + t*g .. 1 + t*g + g - 1 (g = patches per token) in pixel-shuffle
    order, so the output regroups with a reshape; the layers add no positional term, so the order is free. Tiles of
    different counts run packed (``pruning.packing``): the layers do the work of the real tokens only.
    """
    tiles, k_max = indices.shape
    per_token = groups.shape[1]
    patch_index = groups[indices.clamp(min=0)].reshape(tiles, k_max * per_token)  # [T, k_max*g]
    patch_mask = mask.repeat_interleave(per_token, dim=1)
    patches = torch.gather(hidden[:, 1:], 1, patch_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    tokens = torch.cat([hidden[:, :1], patches], dim=1)  # [T, 1 + k_max*g, C]
    if bool(mask.all()):
        for layer in layers:
            tokens = layer(tokens)
    else:  # tiles keep different counts: their real tokens run back to back, each tile attending to itself
        layout = PackedLayout.from_mask(with_cls(patch_mask), PACK_MULTIPLE)
        packed = layout.pack(tokens)[None]
        for layer in layers:
            packed = layer(packed, None, layout)
        tokens = layout.unpack(packed[0])
    features = tokens[:, 1:].reshape(tiles, k_max, -1)
    return torch.where(mask.unsqueeze(-1), features, torch.zeros((), dtype=features.dtype, device=features.device))


def _pooled_choice(ranking: torch.Tensor, keep: torch.Tensor, tiles_per_image: Sequence[int]) -> torch.Tensor:
    """[T, n] bool: per image, the sum of its tiles' k spent on its best-ranked tokens over all its tiles."""
    tiles, n = ranking.shape
    if sum(tiles_per_image) != tiles:
        raise ValueError(f"tiles_per_image {list(tiles_per_image)} does not add up to the {tiles} tiles given")
    chosen = torch.zeros(tiles * n, dtype=torch.bool, device=ranking.device)
    start = 0
    for count in tiles_per_image:
        span = slice(start * n, (start + count) * n)
        budget = int(keep[start : start + count].sum())
        best = torch.sort(ranking[start : start + count].reshape(-1), descending=True, stable=True).indices[:budget]
        chosen[span][best] = True
        start += count
    return chosen.view(tiles, n)


def _raster_indices(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen positions [T, n] bool -> (indices [T, k_max] in raster order with -1 padding, mask [T, k_max])."""
    tiles, n = chosen.shape
    positions = torch.arange(n, device=chosen.device)
    order = torch.sort(torch.where(chosen, positions, positions + n), dim=-1).values
    keep = chosen.sum(dim=1)
    k_max = max(int(keep.max()), 1)
    mask = positions[:k_max] < keep.unsqueeze(1)
    return torch.where(mask, order[:, :k_max], -1), mask
