"""The attention side of stage 2: feed ``KVEvictionCache`` the few attention probabilities eviction needs.

``enable_kv_eviction(model)`` leaves the model's attention backend in charge of every attention output. It renames
the backend (``sdpa`` -> ``kv_eviction_sdpa``, ``flash_attention_2`` -> ``kv_eviction_flash_attention_2``) to a
registered wrapper that calls the original, and adds a forward pre-hook to each attention module that hands the
wrapper the ``past_key_values`` of the call. Without a ``KVEvictionCache`` the wrapper is a plain pass-through.
With one, it additionally computes:

* at prefill, the column sums of the softmax probabilities, in blocks of heads x queries (never a P x P matrix for
  all heads at once);
* at each decode step, the single new row of probabilities;

and, once a layer has evicted keys, replaces the model's mask by the cache's own slot mask (``[batch, 1, 1, slots]``
for SDPA, ``[batch, slots]`` for flash-attention, whose varlen path then skips the empty slots).

A packed prefill (``pruning.packing``) hands the wrapper one row holding every sample back to back and the
``PackedPrefillCache`` in front of the eviction cache: the column sums are then computed on the samples unpacked
in the left-padded layout the cache binds its budgets from (pads masked, as in a padded prefill). Its
SDPA variant, ``kv_eviction_packed_sdpa``, wraps ``packed_sdpa``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from pruning.config import PruningConfig, PruningConfigError
from pruning.kv_cache import KVEvictionCache, KVEvictionLayer
from pruning.llm import KVCachePolicy, register_kv_method
from pruning.packing import PACKED_SDPA, PackedLayout, PackedPrefillCache, register_packed_sdpa
from pruning.registry import Param, at_least

PREFIX = "kv_eviction_"


def score_blocking(
    batch: int, kv_heads: int, groups: int, length: int, device: torch.device, block_elements: int | None = None
) -> tuple[int, int]:
    """(KV heads, queries) per block when scoring the prompt.

    A block holds at most ``block_elements`` logits (2^20 on CPU, so that it stays in cache; 2^26 on GPUs, so that
    kernels are few). Queries come in slices of at most P/8, since the keys after a slice's last query are skipped
    but the triangle inside the slice is computed and thrown away; KV heads then fill the block.
    """
    elements = block_elements or (1 << 20 if device.type == "cpu" else 1 << 26)
    row = batch * groups * length
    queries = max(1, min(max(1, length // 8), elements // row))
    heads = max(1, min(kv_heads, elements // (row * queries)))
    return heads, queries


def prefill_column_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    block_elements: int | None = None,
) -> torch.Tensor:
    """s_j = sum over real queries i >= j of softmax_i(j), summed over each KV head's query group.

    query ``[batch, heads, P, dim]``, key ``[batch, kv_heads, P, dim]``, key_valid ``[batch, P]`` (left padding,
    pads False). Returns ``[batch, kv_heads, P]`` in fp32; pads score 0 and pad queries add nothing. The logits are
    made one block of KV heads x queries at a time (see ``score_blocking``; memory never O(P^2) for all heads);
    each block is exponentiated in place and its normalisation folded into the weights of one matrix-vector
    product, so a block costs a matmul, three passes and a GEMV.
    """
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    head_block, queries = score_blocking(batch, kv_heads, groups, length, query.device, block_elements)
    grouped = (query * scaling).reshape(batch, kv_heads, groups, length, dim)
    keys_t = key.transpose(-1, -2)[:, :, None]  # [batch, kv_heads, 1, dim, P]
    scores = torch.zeros(batch, kv_heads, 1, length, dtype=torch.float32, device=query.device)
    positions = torch.arange(length, device=query.device)
    padded = not bool(key_valid.all())
    row_weight = key_valid.float()  # pad queries count 0
    for h0 in range(0, kv_heads, head_block):
        h1 = min(kv_heads, h0 + head_block)
        for start in range(0, length, queries):
            end = min(length, start + queries)
            logits = torch.matmul(grouped[:, h0:h1, :, start:end], keys_t[:, h0:h1, ..., :end]).float()
            if padded:  # real queries never see pads; pad queries keep their (pad) keys so that no row is all -inf
                blocked = ~key_valid[:, None, :end] & key_valid[:, start:end, None]
                logits.masked_fill_(blocked[:, None, None], -math.inf)
            future = positions[None, start:end] > positions[start:end, None]  # only the diagonal block has any
            logits[..., start:end].masked_fill_(future, -math.inf)
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            weight = row_weight[:, None, None, start:end] / logits.sum(dim=-1)  # [batch, block, groups, queries]
            rows = logits.reshape(batch, h1 - h0, groups * (end - start), end)
            scores[:, h0:h1, :, :end] += torch.matmul(weight.reshape(batch, h1 - h0, 1, -1), rows)
    return scores[:, :, 0]


def packed_column_scores(
    query: torch.Tensor, key: torch.Tensor, layout: PackedLayout, scaling: float, block_elements: int | None = None
) -> torch.Tensor:
    """``prefill_column_scores`` of a packed prefill: query ``[1, heads, T, dim]`` and key ``[1, kv_heads, T, dim]``
    hold the samples back to back. They are scored in the layout's left-padded slots (pads masked, as a padded
    prefill scores them: one batched pass, not a kernel series per sample); returns ``[rows, kv_heads, length]``."""

    def padded(states: torch.Tensor) -> torch.Tensor:  # [1, heads, T, dim] -> [rows, heads, length, dim]
        return layout.unpack(states[0].transpose(0, 1)).transpose(1, 2)

    return prefill_column_scores(padded(query), padded(key), layout.valid, scaling, block_elements)


def decode_row_probs(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """The new query's softmax probabilities over the cached slots, summed over each KV head's query group.

    query ``[batch, heads, 1, dim]``, key ``[batch, kv_heads, slots, dim]``, key_valid ``[batch, slots]``.
    Returns ``[batch, kv_heads, slots]`` in fp32, 0 on empty slots.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling
    logits = logits.masked_fill(~key_valid[:, None, None, :], -math.inf)
    return torch.softmax(logits, dim=-1).sum(dim=2)


# ---- the registered wrapper -------------------------------------------------------------------------------
def _make_wrapper(base_name: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    base = ALL_ATTENTION_FUNCTIONS[base_name]
    flash = "flash" in base_name

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        # flash-attention picks its kernel from module.config._attn_implementation, which now names this wrapper
        backend_module = _BackendView(module, base_name) if flash else module
        cache = getattr(module, "_kv_eviction_cache", None)
        if cache is None:
            return base(backend_module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer: KVEvictionLayer = cache.layers[module.layer_idx]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if layer.awaiting == "prefill":
            output = base(backend_module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            packed = getattr(module, "_kv_eviction_packed", None)
            if packed is not None:  # one row of samples back to back (pruning.packing)
                scores = packed_column_scores(query, key, packed.layout_for(module.layer_idx), scale)
            else:
                scores = prefill_column_scores(query, key, layer.key_valid, scale)
            layer.observe_prefill(scores)
            return output
        if layer.packed:
            attention_mask = None if layer.fully_occupied else _slot_mask(layer.key_valid, flash)
        output = base(backend_module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer.observe_decode(decode_row_probs(query, key, layer.key_valid, scale))
        return output

    attention.__name__ = f"{PREFIX}{base_name}"
    return attention


def _slot_mask(valid: torch.Tensor, flash: bool) -> torch.Tensor:
    return valid if flash else valid[:, None, None, :]


class _BackendView:
    """The attention module as the wrapped backend must see it: same module, config naming the original backend."""

    def __init__(self, module: nn.Module, base_name: str):
        self._module = module
        self.config = _ConfigView(module.config, base_name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _ConfigView:
    def __init__(self, config: Any, base_name: str):
        self._config = config
        self._attn_implementation = base_name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


# ---- installing -------------------------------------------------------------------------------------------
def _bind_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    packed = cache if isinstance(cache, PackedPrefillCache) else None
    cache = packed.inner if packed is not None else cache
    module._kv_eviction_cache = cache if isinstance(cache, KVEvictionCache) else None
    module._kv_eviction_packed = packed if module._kv_eviction_cache is not None else None


def _unbind_cache(module: nn.Module, args: tuple, output: Any) -> None:
    module._kv_eviction_cache = module._kv_eviction_packed = None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Llama-style self-attention: a layer index, GQA groups, a config, and q/k/v projections (separate, or fused
    as Phi-3's qkv_proj: the wrapper sees the split query, key and value either way)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and hasattr(m, "num_key_value_groups")
        and (hasattr(m, "k_proj") or hasattr(m, "qkv_proj"))
    ]


def enable_kv_eviction(model: nn.Module) -> nn.Module:
    """Make ``model.generate(..., past_key_values=KVEvictionCache(...))`` evict keys; idempotent.

    The model keeps its attention backend (SDPA or flash-attention) and behaves exactly as before with any other
    cache. Only the configs of the attention modules found are switched, so e.g. a vision tower sharing the model
    is untouched.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"enable_kv_eviction: no Llama-style attention modules (layer_idx, num_key_value_groups, k_proj or "
            f"qkv_proj) found in "
            f"{type(model).__name__}"
        )
    configs = {id(m.config): m.config for m in modules}
    for config in configs.values():
        _switch_backend(config)
    for module in modules:
        if not getattr(module, "_kv_eviction_hooked", False):
            module.register_forward_pre_hook(_bind_cache, with_kwargs=True)
            module.register_forward_hook(_unbind_cache, always_call=True)
            module._kv_eviction_cache = module._kv_eviction_packed = None
            module._kv_eviction_hooked = True
    return model


def _switch_backend(config: Any) -> None:
    current = config._attn_implementation
    if current is not None and current.startswith(PREFIX):
        return
    if getattr(config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or []
    ):
        raise ValueError(
            "enable_kv_eviction: sliding-window attention is not supported with KV eviction "
            f"(config.sliding_window={getattr(config, 'sliding_window', None)!r}); set it to None"
        )
    if current != "sdpa" and not (current or "").startswith("flash_attention"):
        raise ValueError(
            f"enable_kv_eviction: attention implementation {current!r} is not supported; KV eviction wraps 'sdpa' or "
            "'flash_attention_*' (load the model with attn_implementation='sdpa')"
        )
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(current))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    if current == "sdpa" and PREFIX + PACKED_SDPA not in ALL_ATTENTION_FUNCTIONS:  # a packed prefill's variant
        register_packed_sdpa()
        AttentionInterface.register(PREFIX + PACKED_SDPA, _make_wrapper(PACKED_SDPA))
    config._attn_implementation = name


# ---- the registered method -------------------------------------------------------------------------------------
HEAVY_RATIO = Param("heavy_ratio", float, 0.5, "heavy-hitter budget as a fraction of the prompt", check=at_least(0))
RECENT_RATIO = Param("recent_ratio", float, 0.5, "recent-window budget as a fraction of the prompt", check=at_least(0))
HEAVY_BUDGET = Param(
    "heavy_budget", int, None, "absolute heavy-hitter budget (with --recent-budget)", check=at_least(0), optional=True
)
RECENT_BUDGET = Param("recent_budget", int, None, "absolute recent-window budget", check=at_least(0), optional=True)


def _check_budgets(config: PruningConfig) -> None:
    if (config.heavy_budget is None) != (config.recent_budget is None):
        raise PruningConfigError(
            "heavy_budget and recent_budget must be given together (absolute budgets: --heavy-budget, --recent-budget)"
        )
    if config.heavy_budget is None and config.heavy_ratio + config.recent_ratio <= 0:
        raise PruningConfigError(
            "kv_pruning='h2o' needs heavy_ratio + recent_ratio > 0 (--heavy-ratio, --recent-ratio)"
        )
    if config.heavy_budget == 0 and config.recent_budget == 0:
        raise PruningConfigError(
            "kv_pruning='h2o' with heavy_budget 0 and recent_budget 0 would evict every key; "
            "give heavy_budget + recent_budget >= 1"
        )


def _budget_detail(config: PruningConfig) -> str:
    if config.heavy_budget is not None:
        return f"heavy={config.heavy_budget}, recent={config.recent_budget}"
    return f"heavy={config.heavy_ratio}, recent={config.recent_ratio}"


@register_kv_method(
    "h2o",
    params=(HEAVY_RATIO, RECENT_RATIO, HEAVY_BUDGET, RECENT_BUDGET),
    description="The paper (stage 2): heavy-hitter KV eviction with H2O's generation semantics; per layer and KV "
    "head, keep the recent window plus the keys with the largest accumulated attention.",
    check=_check_budgets,
    detail=_budget_detail,
)
class H2O(KVCachePolicy):
    def prepare(self, model: nn.Module) -> None:
        enable_kv_eviction(model)

    def make_cache(self, attention_mask: torch.Tensor) -> KVEvictionCache:
        return KVEvictionCache(self.config, attention_mask)

    def budgets(self, cache: KVEvictionCache) -> list[int | None]:
        return list(cache.budgets())
