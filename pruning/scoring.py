"""CLS-similarity scores of the patch tokens at one CLIP layer (paper eq. 1), computed directly.

Only the CLS row is needed, so we never ask the tower for attention maps (that would force eager attention on every
layer). We recompute that row from the layer's own weights, in fp32, on the layer's input hidden_states[visual_layer].

Both modes use that the key bias adds q_cls . b_k to every key of the row, a constant the softmax removes; so
q_cls . k_j = (W_k^T q_cls) . x_j + const and the whole row costs one matrix-vector product per sample and head
instead of projecting all keys.

- "full" (paper eq. 1, default): q and k of full width D, heads not split, scaled by 1/sqrt(D), softmax over the n
  patch keys only (the CLS key is not a candidate, so it takes no share of the distribution).
- "heads": the model's own attention: per-head softmax with 1/sqrt(head_dim) over all 1+n keys, CLS key included,
  then the patch columns averaged over heads, not renormalised. This is exactly the CLS row that ``output_attentions``
  returns in eager mode (the quantity FastV / PruMerge-style methods read), so the two are directly comparable. Not
  renormalising only rescales each head by its share of attention on patches; the split point i* is invariant to
  rescaling the whole curve but not per head, and a head that mostly looks at CLS rightly counts less.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCORE_MODES = ("full", "heads")


def cls_patch_scores(layer: nn.Module, hidden_states: torch.Tensor, mode: str = "full") -> torch.Tensor:
    """Scores [B, n] fp32 of the n patch tokens, from ``layer`` (a CLIPEncoderLayer) on its input [B, 1+n, D].

    Duck-typed: ``layer`` needs ``layer_norm1``, ``self_attn.q_proj``, ``self_attn.k_proj`` and
    ``self_attn.num_heads``. The result is detached: the selection it drives is an index, not a differentiable op.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown visual score mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
    if hidden_states.dim() != 3 or hidden_states.shape[1] < 2:
        raise ValueError(f"hidden_states must be [batch, 1 + n_patches, dim] with n >= 1, got {hidden_states.shape}")
    with torch.no_grad():
        norm = layer.layer_norm1
        tokens = F.layer_norm(
            hidden_states.float(), norm.normalized_shape, _fp32(norm.weight), _fp32(norm.bias), norm.eps
        )  # [B, 1+n, D]
        attn = layer.self_attn
        query = F.linear(tokens[:, 0], _fp32(attn.q_proj.weight), _fp32(attn.q_proj.bias))  # [B, D]
        key_weight = _fp32(attn.k_proj.weight)  # [D_out, D_in]
        dim = query.shape[-1]
        if mode == "full":
            folded = query @ key_weight  # [B, D_in] = W_k^T q_cls
            logits = torch.einsum("bnd,bd->bn", tokens[:, 1:], folded) / math.sqrt(dim)
            return torch.softmax(logits, dim=-1)
        heads = attn.num_heads
        head_dim = dim // heads
        folded = torch.einsum("bhe,hed->bhd", query.view(-1, heads, head_dim), key_weight.view(heads, head_dim, -1))
        logits = torch.einsum("bnd,bhd->bhn", tokens, folded) / math.sqrt(head_dim)  # [B, H, 1+n]
        return torch.softmax(logits, dim=-1)[:, :, 1:].mean(dim=1)


def _fp32(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.detach().float()
