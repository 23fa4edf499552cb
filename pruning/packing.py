"""Packed prefill: the language model's prefill on the concatenated real tokens of a left-padded batch.

A dynamic method keeps a different number of visual tokens per sample, so a left-padded batch computes every sample
at the longest prompt. Packing runs the prefill on the ``T = sum(L_b)`` real tokens in one row instead of
``B x max(L_b)``, each sample with its own positions (0 .. L_b - 1) and attention confined to itself:

* flash-attention (``flash_attention_2`` / ``_3``): transformers hands the ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` keywords of every forward to ``flash_attn_varlen_func`` (``cu_seqlens_q/k``: int32
  ``[B + 1]`` cumulative lengths starting at 0; ``max_seqlen_q/k``: the longest sample; q, k, v
  ``[total_tokens, heads, head_dim]``; ``causal=True``), the library's variable-length kernel;
* SDPA: ``packed_sdpa`` (registered under that name). On CUDA in fp16 / bf16 it calls PyTorch's own
  FlashAttention-2 variable-length kernel (``torch.nn.attention.varlen.varlen_attn``, same cumulative lengths;
  causal as flash-attention's bottom-right window ``(-1, 0)``): one kernel per layer. Elsewhere (CPU, fp32, older
  torch) it runs SDPA once per sample on its own slice, causal, exactly the kernel call of a batch-1 run, costing
  ``sum(L_b^2)`` scores. A block-diagonal mask (``PackedLayout.block_diagonal_mask``) gives the same result at
  ``T^2`` cost; it is kept as the reference.

Decoding continues from the caches the prefill filled: ``PackedPrefillCache`` stands in for the generation cache
during the prefill and writes each layer's keys and values into it in the usual left-padded layout, so the decode
steps are an ordinary padded batch (a KV-eviction cache included: it binds its per-sample budgets from the same
padded layout). ``packed_prefill(decoder)`` arms this for one ``generate`` call: a forward pre-hook on the decoder
(e.g. ``LlamaModel``) packs the first forward (the prefill), a forward hook unpacks its hidden states to
``[B, L, hidden]``, so the LM head, logits processors and decode steps see what a padded prefill returns.

The packed row is filled up to a multiple of ``PACK_MULTIPLE`` tokens with a filler segment (zeros, attending only
to itself, dropped on unpacking): matrix products run at full speed on whole tiles of rows (measured on the CPU of
docs/speed.md, bf16: 1441 rows ran 10 % slower than 1440 or 1456), and a filler of at most 15 tokens costs less.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PACKED_SDPA = "packed_sdpa"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
PACK_MULTIPLE = 16  # the packed row's length is filled up to a multiple of this (tiles of matrix-product kernels)


@dataclass(frozen=True)
class PackedLayout:
    """Where the real tokens of a padded batch sit: packing keeps them in row-major order (sample by sample, each in
    its own order), so ``packed = padded[valid]`` and ``padded[valid] = packed``."""

    valid: torch.Tensor  # [rows, length] bool: real tokens (left padding: False first)
    lengths: tuple[int, ...]  # real tokens per row
    cu_seqlens: torch.Tensor  # [rows + 1] int32, 0 first: flash-attention's cumulative sequence lengths
    flat_index: torch.Tensor  # [total] long: each packed token's slot in the flattened [rows * length] view
    multiple: int = 1  # the packed row is filled up to a multiple of this (a filler segment after the samples)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, multiple: int = 1) -> PackedLayout:
        if multiple < 1:
            raise ValueError(f"a packed row's multiple must be at least 1, got {multiple}")
        if attention_mask.dim() != 2:
            raise ValueError(f"a packed layout needs a [rows, length] mask, got shape {tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        counts = valid.sum(dim=1)
        lengths = tuple(int(n) for n in counts.tolist())
        if min(lengths) < 1:
            raise ValueError(f"every row needs at least one real token to pack, got lengths {list(lengths)}")
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=valid.device)
        cu_seqlens[1:] = torch.cumsum(counts, dim=0)
        # index once (one host sync), so that packing and unpacking each layer's tensors never waits on the device
        return cls(valid, lengths, cu_seqlens, valid.flatten().nonzero().flatten(), multiple)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def fill(self) -> int:
        """Filler tokens after the samples, so that the packed row holds a multiple of ``multiple`` tokens."""
        return -self.total % self.multiple

    @property
    def width(self) -> int:
        """Tokens in the packed row: the samples', then the filler."""
        return self.total + self.fill

    @property
    def max_seqlen(self) -> int:
        return max(*self.lengths, self.fill)

    def segments(self) -> list[tuple[int, int]]:
        """(start, end) of each sample in the packed sequence."""
        ends = torch.tensor(self.lengths).cumsum(0).tolist()
        return [(end - length, end) for end, length in zip(ends, self.lengths)]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[rows, length, ...] -> [width, ...]: the real tokens, then the filler's zeros."""
        packed = padded.flatten(0, 1).index_select(0, self.flat_index)
        if not self.fill:
            return packed
        return torch.cat([packed, packed.new_zeros(self.fill, *packed.shape[1:])])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[width, ...] (or [total, ...]) -> [rows, length, ...], zeros on padding; the filler is dropped."""
        if packed.shape[0] not in (self.total, self.width):
            raise ValueError(f"a packed row of {self.width} tokens ({self.total} real) cannot hold {packed.shape[0]}")
        packed = packed[: self.total]
        padded = packed.new_zeros(self.valid.numel(), *packed.shape[1:])
        padded.index_copy_(0, self.flat_index, packed)
        return padded.view(*self.valid.shape, *packed.shape[1:])

    def position_ids(self) -> torch.Tensor:
        """[1, width]: 0 .. L_b - 1 for each sample, the positions a batch-1 run gives it (the filler: 0 .. fill - 1)."""
        lengths = [*self.lengths, self.fill] if self.fill else self.lengths
        return torch.cat([torch.arange(n, device=self.valid.device) for n in lengths])[None]

    def attention_kwargs(self) -> dict[str, Any]:
        """The keywords transformers passes to the attention functions (``FlashAttentionKwargs``), which
        flash-attention hands to ``flash_attn_varlen_func`` as ``cu_seqlens_q/k`` and ``max_seqlen_q/k``; the filler
        is one more sequence."""
        return {
            "cu_seq_lens_q": self.filled_cu_seqlens,
            "cu_seq_lens_k": self.filled_cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    @functools.cached_property
    def filled_cu_seqlens(self) -> torch.Tensor:
        """``cu_seqlens`` with the filler as one more sequence; built once, as every layer passes it."""
        if not self.fill:
            return self.cu_seqlens
        return torch.cat([self.cu_seqlens, self.cu_seqlens.new_tensor([self.width])])

    def block_diagonal_mask(self) -> torch.Tensor:
        """[1, 1, total, total] bool: a query sees the earlier tokens of its own sample (the SDPA reference)."""
        sample = torch.repeat_interleave(
            torch.arange(self.rows, device=self.valid.device),
            torch.tensor(self.lengths, device=self.valid.device),
        )
        index = torch.arange(self.total, device=self.valid.device)
        return ((sample[:, None] == sample[None, :]) & (index[None, :] <= index[:, None]))[None, None]


def segments_of(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


# ---- attention -------------------------------------------------------------------------------------------------
def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA on packed sequences: query ``[1, heads, T, dim]``, key / value ``[1, kv_heads, T, dim]`` hold the samples
    back to back as ``cu_seq_lens_q`` says; each sample attends causally to itself, through transformers' own SDPA
    function (GQA, scaling as configured). Returns ``[1, T, heads, dim]`` as the attention functions do. Without
    ``cu_seq_lens_q`` it is plain SDPA."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if cu_seq_lens_q is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed_sdpa takes one packed row and no attention mask (the lengths say who sees whom)")
    # the layout passes one tensor for both; comparing values would wait on the GPU at every layer
    if (
        cu_seq_lens_k is not None
        and cu_seq_lens_k is not cu_seq_lens_q
        and not torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    ):
        raise ValueError("packed_sdpa runs a prefill: queries and keys must have the same sequence lengths")
    kernel = cuda_varlen_kernel(query)
    if kernel is not None and kwargs.get("dropout", 0.0) == 0.0:
        groups = query.shape[1] // key.shape[1]
        gqa = {}
        if groups > 1 and "enable_gqa" in varlen_parameters():
            gqa = {"enable_gqa": True}
        elif groups > 1:
            key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        flat = [t[0].transpose(0, 1) for t in (query, key, value)]  # [T, heads, dim]
        longest = int(max_length_q) if max_length_q is not None else int(cu_seq_lens_q.diff().max())
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        window = (-1, 0) if causal else (-1, -1)  # flash-attention's bottom-right causal window, or none (CLIP)
        out = kernel(
            *flat, cu_seq_lens_q, cu_seq_lens_q, longest, longest, scale=kwargs.get("scaling"), window_size=window,
            **gqa,
        )  # fmt: skip
        return out[None], None
    outputs = [
        sdpa(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, **kwargs)[0]
        for start, end in segments_of(cu_seq_lens_q)
    ]
    return torch.cat(outputs, dim=1), None


def cuda_varlen_kernel(query: torch.Tensor) -> Callable | None:
    """PyTorch's FlashAttention-2 varlen kernel where it applies (CUDA, fp16 / bf16, a torch whose ``varlen_attn``
    takes ``scale`` and ``window_size``), else None."""
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    if not {"scale", "window_size"} <= varlen_parameters():
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def varlen_parameters() -> frozenset[str]:
    """The keyword names torch's ``varlen_attn`` takes (empty before torch 2.9, which has none), read once."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.9: the per-sample SDPA path
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def register_packed_sdpa() -> None:
    """Register ``packed_sdpa`` with transformers' attention functions (idempotent)."""
    if PACKED_SDPA not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(PACKED_SDPA, packed_sdpa)


def packed_backend(name: str | None) -> str | None:
    """The attention implementation a packed prefill runs under in place of ``name``, or None when there is none:
    flash-attention reads the lengths itself; an SDPA-based name (``sdpa``, stage 2's ``kv_eviction_sdpa``) maps to
    its ``packed_sdpa`` counterpart, where one is registered; eager and anything else cannot pack."""
    if name is None:
        return None
    if "flash_attention" in name:
        return name
    if not name.endswith("sdpa"):
        return None
    register_packed_sdpa()
    packed = name.removesuffix("sdpa") + PACKED_SDPA
    return packed if packed in ALL_ATTENTION_FUNCTIONS else None


@contextmanager
def packed_attention(configs: list[Any]) -> Iterator[None]:
    """Switch these configs' attention implementations to their packed variants (``packed_backend``) for the block;
    a config whose implementation has none raises before anything is changed."""
    saved = [(config, config._attn_implementation) for config in configs]
    packed = [packed_backend(name) for _, name in saved]
    for (_, name), variant in zip(saved, packed):
        if variant is None:
            raise ValueError(f"attention implementation {name!r} has no packed variant (sdpa and flash_attention_* do)")
    try:
        for config, variant in zip(configs, packed):
            config._attn_implementation = variant
        yield
    finally:
        for config, name in saved:
            config._attn_implementation = name


# ---- the cache seen during the prefill ---------------------------------------------------------------------------
@dataclass
class PackedPrefillCache:
    """Stands in for the generation cache during a packed prefill.

    ``update`` receives a layer's packed keys and values ``[1, kv_heads, T, dim]``, writes them into ``inner`` in the
    left-padded layout ``[rows, kv_heads, length, dim]`` (what a padded prefill would have written, pads zero and
    masked later) and returns them packed for the prefill's attention. A layer that sees fewer tokens (token dropping
    between decoder layers, ``pruning.llm``) is told so through ``set_layer_prompt``, which is also passed on to the
    inner cache when that one keeps per-layer prompts (stage 2's ``KVEvictionCache``).
    """

    inner: Any  # transformers Cache (DynamicCache, KVEvictionCache, ...), empty
    layout: PackedLayout
    layer_layouts: dict[int, PackedLayout] = field(default_factory=dict)
    is_compileable = False

    def layout_for(self, layer_idx: int) -> PackedLayout:
        return self.layer_layouts.get(layer_idx, self.layout)

    @property
    def final_layout(self) -> PackedLayout:
        """The tokens leaving the last decoder layer (fewer than entered where a dropper shortened the prompt)."""
        return self.layer_layouts[max(self.layer_layouts)] if self.layer_layouts else self.layout

    def set_layer_prompt(self, layer_idx: int, key_valid: torch.Tensor) -> None:
        self.layer_layouts[layer_idx] = PackedLayout.from_mask(key_valid, self.layout.multiple)
        if hasattr(self.inner, "set_layer_prompt"):
            self.inner.set_layer_prompt(layer_idx, key_valid)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layout_for(layer_idx)
        if key_states.shape[0] != 1 or key_states.shape[-2] != layout.width:
            raise ValueError(
                f"layer {layer_idx} of a packed prefill got keys {tuple(key_states.shape)}; expected one row of "
                f"{layout.width} tokens"
            )

        def padded(states: torch.Tensor) -> torch.Tensor:  # [1, heads, T, dim] -> [rows, heads, length, dim]
            return layout.unpack(states[0].transpose(0, 1)).transpose(1, 2)

        self.inner.update(padded(key_states), padded(value_states), layer_idx)
        return key_states, value_states

    # what transformers' mask creation asks a cache (flash-attention path): nothing is cached before the prefill
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0


# ---- arming one generate call ---------------------------------------------------------------------------------
def attention_configs(model: nn.Module) -> list[Any]:
    """The distinct configs of the attention modules in ``model`` (a decoder, a run of tower layers): what selects
    their attention function. transformers' attention modules say whether they are causal (``is_causal``)."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "is_causal") and config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    return list(configs.values())


def unsupported_reason(decoder: nn.Module) -> str | None:
    """Why this decoder's prefill cannot be packed, or None: its attention function has no packed variant (eager,
    or a custom one), or a sliding window (the packed SDPA path attends to whole samples)."""
    configs = attention_configs(decoder)
    if not configs:
        return f"{type(decoder).__name__} has no attention modules with a config"
    for config in configs:
        name = config._attn_implementation
        if packed_backend(name) is None:
            return f"attention implementation {name!r} has no packed variant (sdpa and flash_attention_* do)"
        window = getattr(config, "sliding_window", None)
        sliding = getattr(config, "use_sliding_window", True) and window is not None
        if sliding or any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            return f"sliding-window attention (sliding_window={window}) is not packed"
    return None


class PackedPrefill:
    """The hooks behind ``packed_prefill``: pack the decoder's first forward, unpack its output."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.configs = attention_configs(decoder)
        self.attention: ExitStack | None = None  # the packed attention switch, held from before() to after()
        self.layout: PackedLayout | None = None
        self.cache: PackedPrefillCache | None = None
        self.done = False  # the prefill has run (packed or not): later forwards are decode steps
        self.packed = False  # the prefill ran packed

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self.done:
            return None
        self.done = True
        if args:
            raise ValueError("packed_prefill expects the decoder to be called with keyword arguments, as generate does")
        embeds, mask, cache = kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("past_key_values")
        if embeds is None and kwargs.get("input_ids") is not None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        if (
            embeds is None
            or mask is None
            or mask.dim() != 2
            or mask.shape != embeds.shape[:2]
            or bool(mask.bool().all())  # nothing to save: no padding
            or cache is None
            or cache.get_seq_length() != 0
        ):
            return None
        self.layout = PackedLayout.from_mask(mask, PACK_MULTIPLE)
        self.cache = PackedPrefillCache(cache, self.layout)
        kwargs = {**kwargs, "input_ids": None, "inputs_embeds": self.layout.pack(embeds)[None]}
        kwargs.update(attention_mask=None, position_ids=self.layout.position_ids(), past_key_values=self.cache)
        kwargs.update(self.layout.attention_kwargs())
        self.attention = ExitStack()
        self.attention.enter_context(packed_attention(self.configs))
        self.packed = True
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self.attention is None:
            return None
        self.restore_attention()
        output["last_hidden_state"] = self.cache.final_layout.unpack(output["last_hidden_state"][0])
        if "past_key_values" in output:
            output["past_key_values"] = self.cache.inner
        return output

    def restore_attention(self) -> None:
        if self.attention is not None:
            self.attention.close()
            self.attention = None


@contextmanager
def packed_prefill(decoder: nn.Module) -> Iterator[PackedPrefill]:
    """Pack the prefill of one ``generate`` call on ``decoder`` (the base model whose layers hold the attention, called
    with ``inputs_embeds``, a 2D ``attention_mask``, ``position_ids`` and ``past_key_values``, as transformers'
    Llama / Mistral / Qwen2 / Phi-3 models are). A prefill without padding runs as it is. Check
    ``unsupported_reason(decoder)`` first."""
    reason = unsupported_reason(decoder)
    if reason is not None:
        raise ValueError(f"cannot pack the prefill: {reason}")
    state = PackedPrefill(decoder)
    handles = [
        decoder.register_forward_pre_hook(state.before, with_kwargs=True),
        decoder.register_forward_hook(state.after, with_kwargs=True, always_call=True),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        state.restore_attention()  # a failed prefill whose forward hook did not run


def lengths_differ(attention_mask: torch.Tensor | None) -> bool:
    """True when a batch's rows have different numbers of real tokens (some padding to save)."""
    return attention_mask is not None and attention_mask.shape[0] > 1 and not bool(attention_mask.bool().all())
