"""Stage 1 in the vision tower: run CLIP layer by layer, score the patches at ``visual_layer``, keep the head.

Layer convention (HF indexing): hidden_states[0] is the pre-layer-normed embedding, hidden_states[i] the output of
encoder.layers[i-1]. The scores come from encoder.layers[visual_layer]'s projections applied to its input
hidden_states[visual_layer]; the features come from hidden_states[select_layer] (-2 for LLaVA-1.5). Only the layers up
to the later of the two are run; upstream ran all 24 and threw the last one away.

Modes:
- "select" (default): the tower is untouched; the kept patches are gathered from hidden_states[select_layer].
- "inside": from hidden_states[visual_layer] on, encoder.layers[visual_layer:select] run on CLS + kept tokens only
  (padded to the longest sample, padded keys masked out), which cuts tower compute. Needs an attention implementation
  that takes an additive 4D mask (sdpa, eager) whenever samples keep different counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning.config import PruningConfig
from pruning.scoring import cls_patch_scores
from pruning.strategies import apply_strategy

SELECT_FEATURES = ("patch", "cls_patch")


@dataclass
class VisualSelection:
    """Kept visual tokens of a batch, one row per image, padded at the end.

    ``features`` [B, t, C] and ``mask`` [B, t] cover the output tokens: the kept patches in raster order
    (t = k_max), preceded by CLS when select_feature is "cls_patch" (t = 1 + k_max). ``indices`` [B, k_max] are the
    kept patch indices (0..n-1, raster order), -1 on padding. ``n``, ``inflection`` and ``kept`` are [B] int64;
    ``scores`` [B, n] fp32 are the CLS scores at visual_layer (what i* was computed from).
    """

    features: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    n: torch.Tensor
    inflection: torch.Tensor
    kept: torch.Tensor
    scores: torch.Tensor


def select_visual_tokens(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    config: PruningConfig,
    select_layer: int = -2,
    select_feature: str = "patch",
    generator: torch.Generator | None = None,
) -> VisualSelection:
    """Run the CLIP vision tower on pixel_values [B, 3, H, W] with stage 1 pruning as configured.

    ``vision_model`` is duck-typed: transformers' ``CLIPVisionModel`` (5.x: embeddings, pre_layrnorm, encoder.layers
    on the model itself) or anything with a ``.vision_model`` that has them. ``generator`` only feeds the ``random``
    rule (see ``pruning.strategies.apply_strategy``). Gradients flow into the kept features (a gather); wrap the call
    in ``torch.no_grad()`` for a frozen tower.
    """
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"unknown select_feature {select_feature!r}; choose one of {', '.join(SELECT_FEATURES)}")
    tower = getattr(vision_model, "vision_model", vision_model)
    layers = tower.encoder.layers
    select_index = _resolve_select_layer(select_layer, len(layers))
    _check_visual_layer(config, len(layers), select_index)

    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # hidden_states[0], [B, 1+n, D]
    selected = hidden  # hidden_states[select_index] once reached
    for index, layer in enumerate(layers[: config.visual_layer], start=1):
        hidden = layer(hidden, None)
        if index == select_index:
            selected = hidden
    scores = cls_patch_scores(layers[config.visual_layer], hidden, mode=config.visual_score)  # [B, n]
    decision = apply_strategy(scores, config, generator=generator)
    indices, mask = raster_order_indices(decision.ranking, decision.keep)  # [B, k_max]

    if config.visual_mode == "inside":
        tokens = torch.cat([hidden[:, :1], _gather_patches(hidden[:, 1:], indices, mask)], dim=1)  # [B, 1+k_max, D]
        attention_mask = _key_padding_mask(mask, tokens.dtype)
        _check_mask_support(layers[config.visual_layer], attention_mask)
        for layer in layers[config.visual_layer : select_index]:
            tokens = layer(tokens, attention_mask)
        cls, patches = tokens[:, :1], _zero_padding(tokens[:, 1:], mask)
    else:
        if select_index >= config.visual_layer:
            for layer in layers[config.visual_layer : select_index]:
                hidden = layer(hidden, None)
            selected = hidden
        cls, patches = selected[:, :1], _gather_patches(selected[:, 1:], indices, mask)

    if select_feature == "cls_patch":
        features = torch.cat([cls, patches], dim=1)
        mask_out = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    else:
        features, mask_out = patches, mask
    batch, n = scores.shape
    return VisualSelection(
        features=features,
        mask=mask_out,
        indices=indices,
        n=torch.full((batch,), n, dtype=torch.long, device=scores.device),
        inflection=decision.inflection,
        kept=decision.keep,
        scores=scores,
    )


def raster_order_indices(ranking: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep[b]`` best-ranked patch indices of each row, in raster order: (indices [B, k_max] with -1 padding,
    mask [B, k_max]). Equal ranks go to the earlier patch, so the choice is deterministic."""
    batch, n = ranking.shape
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices  # [B, n] best first
    positions = torch.arange(n, device=ranking.device)
    chosen = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, positions < keep.unsqueeze(1))  # [B, n]
    # Kept patches sort first, each group by raster index.
    raster_first = torch.sort(torch.where(chosen, positions, positions + n), dim=-1).values
    k_max = int(keep.max())
    mask = positions[:k_max] < keep.unsqueeze(1)  # [B, k_max]
    indices = torch.where(mask, raster_first[:, :k_max], -1)
    return indices, mask


def _gather_patches(patches: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """patches [B, n, D] -> [B, k_max, D] at ``indices``, zeros on padding."""
    gathered = torch.gather(patches, 1, indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return _zero_padding(gathered, mask)


def _zero_padding(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def _key_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive [B, 1, 1+k_max, 1+k_max] mask hiding padded keys; None when no sample is padded."""
    if bool(mask.all()):
        return None
    keys = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # CLS is always a key
    blocked = torch.zeros(keys.shape, dtype=dtype, device=mask.device).masked_fill(~keys, torch.finfo(dtype).min)
    length = keys.shape[1]
    return blocked[:, None, None, :].expand(-1, 1, length, length)


def _check_mask_support(layer: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Flash-style kernels take no additive 4D mask; padded keys would silently be attended to."""
    implementation = getattr(getattr(layer.self_attn, "config", None), "_attn_implementation", None) or "eager"
    if attention_mask is not None and implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"visual_mode 'inside' with samples keeping different counts needs 'sdpa' or 'eager' attention in the "
            f"vision tower, found {implementation!r}; load the tower with attn_implementation='sdpa' or use batch 1"
        )


def _resolve_select_layer(select_layer: int, num_layers: int) -> int:
    """hidden_states index in 0..num_layers (-2 -> num_layers - 1, as upstream's hidden_states[-2])."""
    index = select_layer + num_layers + 1 if select_layer < 0 else select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"select_layer {select_layer} is out of range for a tower with {num_layers} layers "
            f"(hidden_states has {num_layers + 1} entries)"
        )
    return index


def _check_visual_layer(config: PruningConfig, num_layers: int, select_index: int) -> None:
    if config.visual_layer >= num_layers:
        raise ValueError(
            f"visual_layer {config.visual_layer} needs encoder.layers[{config.visual_layer}], "
            f"but the vision tower has {num_layers} layers (valid: 0..{num_layers - 1})"
        )
    if config.visual_mode == "inside" and config.visual_layer > select_index:
        raise ValueError(
            f"visual_mode 'inside' prunes at hidden_states[{config.visual_layer}], after the select layer "
            f"hidden_states[{select_index}]; use a visual_layer <= {select_index} or visual_mode 'select'"
        )
