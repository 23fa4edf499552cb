"""LLaVA-PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388), after the official code: 42Shawn/LLaVA-PruMerge at
097c04116a58465e4bcb58cec44a94018a68ff1a, ``llava/model/multimodal_encoder/clip_encoder.py``
(``token_prune_merge_advanced`` and ``token_prune_merge_advanced_plus``).

Per image, at the last tower layer (the official hooks ``encoder.layers[23]`` of a 24-layer CLIP, whose input is
LLaVA's select layer hidden_states[-2]):

- CLS attention, one head of full width D: ``a = softmax(q_cls . k_j / sqrt(D))`` over all 1 + n keys, the CLS
  column dropped (not renormalised); q and k are the layer's ``q_proj`` / ``k_proj`` outputs (bias included).
- Adaptive count (IQR): ``r = #{j : a_j > Q3 + 1.5 IQR} / n`` (numpy's linear percentiles), ``k = int(n r)``; the k
  patches with the largest a are kept, in descending order of a.
- PruMerge+ adds spatially uniform samples ``arange(0, n - 1, int(int(1 / r) / 3))`` that are not kept already,
  after the attention picks.
- Merge: each kept token adds the a-weighted sum (weights not normalised) of the select-layer features of its 32
  nearest other tokens by cosine similarity of the layer's keys; one extra token, the a-weighted sum of every
  pruned token, closes the sequence.

What differs from the official code (docs/baselines.md lists it): the count is taken per image (the official pools
the percentiles over the whole batch, which it only ran at batch 1); everything is computed in fp32 from the layer's
weights, without hooks and without eager attention; a count of 0 keeps only the extra token (PruMerge+: plus patch
0, the limit of the sample stride; the official divides by zero); ``n - 1`` stands for the official literal 575.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.baselines.common import fp32, gather_rows, require_budget, token_budget
from pruning.config import PruningConfig
from pruning.registry import Param, at_least
from pruning.strategies import VISUAL_TOPK
from pruning.visual import ReducedPatches, VisionContext, register_vision_method

PRUMERGE_IQR_FACTOR = Param(
    "prumerge_iqr_factor", float, 1.5, "outliers: CLS attention above Q3 + factor * IQR", check=at_least(0)
)
PRUMERGE_NEIGHBOURS = Param(
    "prumerge_neighbours", int, 32, "nearest tokens (key cosine) each kept token absorbs", check=at_least(1)
)
PRUMERGE_ADAPTIVE = Param(
    "prumerge_adaptive", bool, True, "count by the IQR rule (official); false: --visual-tokens minus the extra token"
)
PRUMERGE_PLUS_STRIDE = Param(
    "prumerge_plus_stride", int, 3, "PruMerge+ samples every int(int(1/r) / this) patches", check=at_least(1)
)


def _check_prumerge(config: PruningConfig) -> None:
    if not config.prumerge_adaptive:
        require_budget(config)


@register_vision_method(
    "prumerge",
    params=(PRUMERGE_IQR_FACTOR, PRUMERGE_NEIGHBOURS, PRUMERGE_ADAPTIVE, VISUAL_TOPK),
    description="LLaVA-PruMerge: the CLS-attention outliers (IQR) of the last tower layer, each merged with its 32 "
    "nearest tokens by key cosine, plus one token merging the pruned ones (adaptive count).",
    check=_check_prumerge,
    detail=lambda c: "adaptive" if c.prumerge_adaptive else f"k={c.visual_topk}",
    reads_text=False,
)
def prumerge(context: VisionContext) -> ReducedPatches:
    config = context.config
    budget = None if config.prumerge_adaptive else token_budget(config, context.num_patches, "prumerge")
    return prune_and_merge(context, plus=False, budget=budget)


@register_vision_method(
    "prumerge_plus",
    params=(PRUMERGE_IQR_FACTOR, PRUMERGE_NEIGHBOURS, PRUMERGE_PLUS_STRIDE),
    description="PruMerge+: PruMerge's outliers plus spatially uniform samples, merged the same way (adaptive count).",
    reads_text=False,
)
def prumerge_plus(context: VisionContext) -> ReducedPatches:
    return prune_and_merge(context, plus=True, budget=None)


def cls_attention_and_keys(context: VisionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [B, n] fp32, L2-normalised patch keys [B, n, D] fp32) of the last tower layer, on its input."""
    layer = context.layers[-1]
    hidden = context.hidden_states(len(context.layers) - 1)  # [B, 1+n, D]
    attn = layer.self_attn
    norm = layer.layer_norm1
    with torch.no_grad():
        tokens = F.layer_norm(hidden.float(), norm.normalized_shape, fp32(norm.weight), fp32(norm.bias), norm.eps)
        query = F.linear(tokens[:, 0], fp32(attn.q_proj.weight), fp32(attn.q_proj.bias))  # [B, D]
        keys = F.linear(tokens, fp32(attn.k_proj.weight), fp32(attn.k_proj.bias))  # [B, 1+n, D]
        logits = torch.einsum("bnd,bd->bn", keys, query) * keys.shape[-1] ** -0.5
        cls_attention = torch.softmax(logits, dim=-1)[:, 1:]  # the CLS key takes its share; dropped, not renormalised
        return cls_attention, F.normalize(keys[:, 1:], dim=-1)


def outlier_counts(cls_attention: torch.Tensor, factor: float) -> list[int]:
    """Per row, #{a_j > Q3 + factor * (Q3 - Q1)} with linear percentiles (numpy's default), in float64."""
    values = cls_attention.double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device), dim=-1)
    return (values > (q3 + factor * (q3 - q1)).unsqueeze(-1)).sum(dim=-1).tolist()


def prune_and_merge(context: VisionContext, plus: bool, budget: int | None) -> ReducedPatches:
    config = context.config
    features = context.features()[:, 1:]  # [B, n, C]
    batch, n = features.shape[:2]
    device = features.device
    cls_attention, keys = cls_attention_and_keys(context)

    if budget is None:
        counts = outlier_counts(cls_attention, config.prumerge_iqr_factor)
        # the official's k = int(N * ratio) with ratio = count / N, in Python floats
        keep = [int(n * (count / n)) for count in counts]
    else:
        counts, keep = [budget - 1] * batch, [budget - 1] * batch
    positions = torch.arange(n, device=device)
    order = torch.sort(cls_attention, dim=-1, descending=True, stable=True).indices  # [B, n]
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, n))  # rank of each patch by a
    top = rank < torch.tensor(keep, device=device).unsqueeze(1)  # [B, n]
    kept = top
    if plus:
        strides = [_sample_stride(count, n, config.prumerge_plus_stride) for count in counts]
        on_stride = positions % torch.tensor(strides, device=device).unsqueeze(1) == 0
        kept = top | (on_stride & (positions < n - 1) & ~top)
    # kept tokens first (attention picks by descending a, then samples in raster order), pruned ones after
    sort_key = torch.where(top, rank, torch.where(kept, n + positions, 2 * n + positions))
    permutation = torch.sort(sort_key, dim=-1).indices  # [B, n]
    kept_count = kept.sum(dim=1)  # [B]
    k_max = int(kept_count.max())
    kept_indices = permutation[:, :k_max]  # [B, k_max], padded rows hold pruned patches (masked below)
    kept_mask = positions[:k_max] < kept_count.unsqueeze(1)

    merged = _merge_neighbours(features, keys, cls_attention, kept_indices, config.prumerge_neighbours)
    pruned = ~kept
    pruned_attention = torch.where(pruned, cls_attention, torch.zeros((), device=device))
    extra = torch.einsum("bn,bnc->bc", pruned_attention, features.float())  # [B, C]
    # the extra token is laid out at the pruned patch with the largest weight in it (the last patch if none)
    extra_index = torch.where(
        pruned.any(dim=1),
        torch.where(pruned, cls_attention, torch.full((), -1.0, device=device)).argmax(dim=1),
        torch.full((batch,), n - 1, device=device),
    )

    # [kept..., extra] per row, padded at the end
    length = k_max + 1
    slots = torch.arange(length, device=device).unsqueeze(0)
    out = torch.zeros(batch, length, features.shape[-1], dtype=torch.float32, device=device)
    out[:, :k_max] = torch.where(kept_mask.unsqueeze(-1), merged, torch.zeros((), device=device))
    indices = torch.full((batch, length), -1, dtype=torch.long, device=device)
    indices[:, :k_max] = torch.where(kept_mask, kept_indices, -1)
    at_extra = slots == kept_count.unsqueeze(1)  # [B, length]
    out = torch.where(at_extra.unsqueeze(-1), extra.unsqueeze(1), out)
    indices = torch.where(at_extra, extra_index.unsqueeze(1), indices)
    mask = slots <= kept_count.unsqueeze(1)
    return ReducedPatches(out.to(features.dtype), mask, indices, scores=cls_attention)


def _sample_stride(count: int, n: int, divisor: int) -> int:
    """int(int(1 / ratio) / divisor) as the official computes it; ratio 0 (no outlier) is the limit: patch 0 only."""
    if count == 0:
        return n
    return max(1, int(int(1 / (count / n)) / divisor))


def _merge_neighbours(
    features: torch.Tensor, keys: torch.Tensor, cls_attention: torch.Tensor, kept: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """x_i + sum over the ``neighbours`` tokens j != i most key-similar to i of a_j x_j, for every kept i: [B, k, C] fp32.

    The neighbours are drawn from all other patches (kept or not), as the official code does.
    """
    n = features.shape[1]
    count = min(neighbours, n - 1)
    with torch.no_grad():
        similarity = torch.einsum("bkd,bnd->bkn", gather_rows(keys, kept), keys)  # [B, k, n]
        similarity.scatter_(2, kept.unsqueeze(-1), float("-inf"))  # a token is not its own neighbour
        nearest = torch.topk(similarity, count, dim=-1).indices  # [B, k, count]
        weights = torch.zeros_like(similarity).scatter_(
            2, nearest, torch.gather(cls_attention.unsqueeze(1).expand_as(similarity), 2, nearest)
        )  # [B, k, n]
    values = features.float()
    return gather_rows(values, kept) + torch.bmm(weights, values)
