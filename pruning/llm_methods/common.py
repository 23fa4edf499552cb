"""What the LLM-side baselines share: the budget flag, the query / key projections of a decoder layer recomputed for
the few rows a method scores (attention outputs stay with SDPA), and a per-row top-k over the visual tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

from pruning.config import PruningConfig, PruningConfigError
from pruning.h2o import prefill_column_scores
from pruning.registry import Param, at_least

LLM_TOKENS = Param(
    "llm_tokens",
    int,
    None,
    "visual tokens per sample kept after the method's (first) pruning layer, all crops together; unset: the "
    "method's own ratio (fastv, pdrop) or count (dart)",
    check=at_least(1),
    optional=True,
)


def check_layer(config: PruningConfig, param: Param, value: int, layers: Sequence[nn.Module]) -> None:
    """A decoder-layer index of a method's settings must name a layer of this model."""
    if value >= len(layers):
        raise PruningConfigError(
            f"llm_pruning {config.llm_pruning!r}: {param.name} {value} is not a decoder layer of this model, which "
            f"has {len(layers)} (0..{len(layers) - 1}) ({param.cli_flag})"
        )


def token_budget(config: PruningConfig, visual: torch.Tensor) -> list[int] | None:
    """``llm_tokens`` for each row, checked against the visual tokens the row brought into the LLM; None if unset."""
    budget = config.llm_tokens
    if budget is None:
        return None
    counts = visual.sum(dim=1).tolist()
    short = [n for n in counts if 0 < n < budget]
    if short:
        raise PruningConfigError(
            f"llm_pruning {config.llm_pruning!r}: llm_tokens {budget} is above the {min(short)} visual tokens a "
            f"sample brings into the LLM ({LLM_TOKENS.cli_flag}); give a smaller budget or the method's ratio"
        )
    return [min(budget, n) for n in counts]


def fraction_of(count: int, ratio: float) -> int:
    """floor(count * ratio) with the ratio read as the decimal written (0.29 * 100 is 29, as in pruning.kv_cache)."""
    return math.floor(count * Fraction(str(ratio)))


# ---- scores recomputed from a decoder layer -----------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [rows, heads, length, head_dim] with cos / sin [rows, length, rotary_dim] (partial rotary kept)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    width = cos.shape[-1]
    rotary, passed = x[..., :width], x[..., width:]
    first, second = rotary[..., : width // 2], rotary[..., width // 2 :]
    rotated = rotary * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


def _heads(attention: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a Llama-style attention module."""
    config = attention.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, attention.head_dim


def _project(attention: nn.Module, normed: torch.Tensor, which: str) -> torch.Tensor:
    """Queries or keys of ``normed`` [rows, length, hidden] -> [rows, heads, length, head_dim], before RoPE.

    Separate ``q_proj`` / ``k_proj`` (Llama, Mistral, Qwen2) or Phi-3's fused ``qkv_proj`` (query first, then keys).
    """
    heads, kv_heads, dim = _heads(attention)
    count = heads if which == "q" else kv_heads
    if hasattr(attention, "qkv_proj"):
        fused = attention.qkv_proj(normed)
        start = 0 if which == "q" else heads * dim
        projected = fused[..., start : start + count * dim]
    else:
        projected = (attention.q_proj if which == "q" else attention.k_proj)(normed)
    return projected.view(*normed.shape[:2], count, dim).transpose(1, 2)


def layer_keys(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The rotated keys ``layer`` computes from its input ``hidden``: [rows, kv_heads, length, head_dim]."""
    cos, sin = position_embeddings
    return _rotate(_project(layer.self_attn, layer.input_layernorm(hidden), "k"), cos, sin)


def last_row_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
) -> torch.Tensor:
    """The attention the last token of each row pays to every token at ``layer``, averaged over the query heads:
    [rows, length] fp32, 0 on padding. One query row per sample: the keys are projected, the P x P map is not."""
    attention = layer.self_attn
    heads, kv_heads, dim = _heads(attention)
    cos, sin = position_embeddings
    normed = layer.input_layernorm(hidden)
    query = _rotate(_project(attention, normed[:, -1:], "q"), cos[:, -1:], sin[:, -1:])  # [rows, heads, 1, dim]
    key = _rotate(_project(attention, normed, "k"), cos, sin)  # [rows, kv_heads, length, dim]
    rows = hidden.shape[0]
    grouped = query.float().reshape(rows, kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)) * attention.scaling  # [rows, kv, groups, length]
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def all_rows_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
) -> torch.Tensor:
    """The attention each token receives from every real query at ``layer`` (causal), summed over queries and
    averaged over heads: [rows, length] fp32, by stage 2's blocked column-score kernel (never P x P for all heads)."""
    attention = layer.self_attn
    heads = _heads(attention)[0]
    cos, sin = position_embeddings
    normed = layer.input_layernorm(hidden)
    query = _rotate(_project(attention, normed, "q"), cos, sin)
    key = _rotate(_project(attention, normed, "k"), cos, sin)
    return prefill_column_scores(query.float(), key.float(), valid, attention.scaling).sum(dim=1) / heads


def keep_top_visual(
    scores: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    """The keep mask that holds every real non-visual token and, per row, the ``counts[row]`` visual tokens with the
    highest ``scores`` (scores [rows, length]; counts never above the row's visual tokens)."""
    wanted = torch.tensor(list(counts), dtype=torch.long, device=scores.device)
    top = int(wanted.max()) if len(counts) else 0
    chosen = torch.zeros_like(visual)
    if top > 0:
        ranked = scores.float().masked_fill(~visual, -math.inf).topk(top, dim=1).indices
        within = torch.arange(top, device=scores.device)[None, :] < wanted[:, None]  # [rows, top]
        chosen.scatter_(1, ranked, within)
    return valid & (~visual | (chosen & visual))
