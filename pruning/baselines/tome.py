"""ToMe, Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461), after the official code: facebookresearch/ToMe at
af95e4b1befa172dadccd8c81e223b10090f9579, ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``) and
``tome/patch/timm.py`` (``ToMeBlock``, ``ToMeAttention``, ``apply_patch`` with ``prop_attn=True``).

Inside every tower layer up to LLaVA's select layer, between the attention and the MLP, r tokens are merged away:

- metric: the layer's keys averaged over heads, ``m = mean_h k_h`` (``k = k_proj(LN1(x))``), L2-normalised;
- bipartite soft matching: the tokens alternate between set A (even positions, CLS first) and set B (odd positions);
  each A token's best B partner is its most cosine-similar one (CLS has none: it is never merged); the r A tokens
  with the most similar partners are merged into them, the other A tokens stay, sorted back by position;
- size-weighted merge: ``x_B <- (s_B x_B + sum s_A x_A) / (s_B + sum s_A)``, ``s_B <- s_B + sum s_A`` (s = how many
  patches a token holds); the new order is [kept A tokens, all B tokens];
- proportional attention: ``softmax(q k^T / sqrt(d) + log s)`` over the keys, passed to SDPA as an additive mask.

The budget: ``--visual-tokens T`` patch tokens per image (per crop on LLaVA-1.6) after the L layers that produce the
select layer, merged at the official's constant rate, ``r = ceil((n - T) / L)`` per layer until T are left (the
last merging layer takes the remainder). A merge takes at most half of the tokens of a layer; a T that the constant
rate cannot reach is an error naming the flag.

Deviations (docs/baselines.md): each output token is laid out at the patch of the token that survived (merged ones
were folded into it) and the tokens go to the projector in raster order of that patch (the official feeds a
classifier head, for which order does not matter); the attention is recomputed from the layer's weights with SDPA
(the official patches timm's eager attention); sizes and merges are in fp32, cast back to the tower's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pruning.baselines.common import require_budget, token_budget
from pruning.config import PruningConfigError
from pruning.registry import Param
from pruning.strategies import VISUAL_TOPK
from pruning.visual import ReducedPatches, VisionContext, register_vision_method

TOME_PROP_ATTN = Param(
    "tome_prop_attn", bool, True, "proportional attention: log(token size) added to the attention logits"
)


@register_vision_method(
    "tome",
    params=(VISUAL_TOPK, TOME_PROP_ATTN),
    description="ToMe: bipartite soft matching of the keys inside every tower layer up to the select layer, "
    "size-weighted merging and proportional attention, r = ceil((n - visual_topk) / layers) tokens per layer.",
    check=require_budget,
    detail=lambda c: f"k={c.visual_topk}",
    reads_text=False,
)
def tome(context: VisionContext) -> ReducedPatches:
    config = context.config
    n = context.num_patches
    target = token_budget(config, n, "tome")
    schedule = merge_schedule(n, target, context.select_index)
    tokens = context.hidden_states(0)  # [B, 1+n, D], CLS first
    batch = tokens.shape[0]
    size = torch.ones(batch, 1 + n, device=tokens.device)  # patches held by each token, fp32
    origin = torch.arange(-1, n, device=tokens.device).expand(batch, 1 + n)  # surviving patch of each token (CLS: -1)
    for layer, r in zip(context.layers[: context.select_index], schedule):
        tokens, size, origin = merging_layer(layer, tokens, size, origin, r, config.tome_prop_attn)
    # CLS stays first; the patch tokens go out in raster order of their surviving patch
    order = torch.sort(origin[:, 1:], dim=-1).indices  # [B, T]
    indices = torch.gather(origin[:, 1:], 1, order)
    patches = torch.gather(tokens[:, 1:], 1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    mask = torch.ones(indices.shape, dtype=torch.bool, device=tokens.device)
    return ReducedPatches(patches, mask, indices, cls=tokens[:, :1])


def merge_schedule(n: int, target: int, layers: int) -> list[int]:
    """Tokens merged in each of ``layers`` layers: r = ceil((n - target) / layers) while more than ``target`` patches
    are left, never more than the bipartite matching allows (half of the non-CLS tokens)."""
    rate = math.ceil((n - target) / layers) if layers else 0
    schedule, left = [], n
    for _ in range(layers):
        r = min(rate, left - target, left // 2)  # 1 + left tokens, CLS protected: at most left // 2 in set A
        schedule.append(r)
        left -= r
    if left != target:
        reachable = next(t for t in range(1, n + 1) if _reaches(n, t, layers))
        raise PruningConfigError(
            f"visual_pruning 'tome' merges r = ceil((n - visual_topk) / {layers}) tokens in each of the {layers} "
            f"tower layers before the select layer, at most half of a layer's tokens: visual_topk {target} is out "
            f"of reach from n = {n} patches; the smallest reachable count is {reachable} ({VISUAL_TOPK.cli_flag})"
        )
    return schedule


def _reaches(n: int, target: int, layers: int) -> bool:
    rate = math.ceil((n - target) / layers) if layers else 0
    left = n
    for _ in range(layers):
        left -= min(rate, left - target, left // 2)
    return left == target


def merging_layer(
    layer: nn.Module, tokens: torch.Tensor, size: torch.Tensor, origin: torch.Tensor, r: int, prop_attn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CLIP encoder layer with ToMe between its attention and its MLP (the official ``ToMeBlock``).

    tokens [B, t, D], size [B, t] fp32, origin [B, t]; returns them for the t - r tokens after the merge.
    """
    attn = layer.self_attn
    batch, length, width = tokens.shape
    hidden = layer.layer_norm1(tokens)
    heads = (batch, length, attn.num_heads, attn.head_dim)
    query = attn.q_proj(hidden).view(heads).transpose(1, 2)  # [B, H, t, d]
    key = attn.k_proj(hidden).view(heads).transpose(1, 2)
    value = attn.v_proj(hidden).view(heads).transpose(1, 2)
    bias = size.log().to(tokens.dtype)[:, None, None, :] if prop_attn else None  # [B, 1, 1, t] over the keys
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scale)
    tokens = tokens + attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    if r > 0:
        tokens, size, origin = bipartite_merge(tokens, size, origin, key.mean(dim=1), r)
    return tokens + layer.mlp(layer.layer_norm2(tokens)), size, origin


def bipartite_merge(
    tokens: torch.Tensor, size: torch.Tensor, origin: torch.Tensor, metric: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``bipartite_soft_matching`` (class token protected) with ``merge_wavg``.

    metric [B, t, d] (the keys averaged over heads); r <= (t - 1) // 2. Returns tokens, size and origin of the
    t - r tokens [kept A tokens sorted by position (CLS first), all B tokens].
    """
    with torch.no_grad():
        unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [B, tA, tB]
        scores[:, 0, :] = -math.inf  # CLS (A's first token) is never merged
        best, partner = scores.max(dim=-1)  # [B, tA]
        edges = torch.sort(best, dim=-1, descending=True, stable=True).indices  # most similar first
        kept_a = torch.sort(edges[:, r:], dim=-1).values  # [B, tA - r], by position: CLS first
        merged_a = edges[:, :r]  # [B, r]
        into = torch.gather(partner, 1, merged_a)  # [B, r]: the B token each merged A token joins

    def merge(values: torch.Tensor) -> torch.Tensor:
        """values [B, t, c] -> [B, t - r, c] summed into the partners."""
        set_a, set_b = values[:, ::2], values[:, 1::2]
        channels = values.shape[-1]
        kept = torch.gather(set_a, 1, kept_a.unsqueeze(-1).expand(-1, -1, channels))
        moved = torch.gather(set_a, 1, merged_a.unsqueeze(-1).expand(-1, -1, channels))
        set_b = set_b.scatter_reduce(1, into.unsqueeze(-1).expand(-1, -1, channels), moved, reduce="sum")
        return torch.cat([kept, set_b], dim=1)

    weights = size.unsqueeze(-1)  # [B, t, 1]
    summed = merge(tokens.float() * weights)
    new_size = merge(weights)
    new_origin = torch.cat([torch.gather(origin[:, ::2], 1, kept_a), origin[:, 1::2]], dim=1)
    return (summed / new_size).to(tokens.dtype), new_size.squeeze(-1), new_origin
