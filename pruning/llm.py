"""The LLM-side family: methods that act inside the language model, under two selectors a run may set together
with a vision-side method.

``--kv-pruning NAME``: a ``KVCachePolicy`` subclass, registered with ``register_kv_method``. For each ``generate``
call the caller builds ``policy = cls(config)``, calls ``policy.prepare(model)`` (e.g. install an attention wrapper;
idempotent), passes ``policy.make_cache(attention_mask)`` as ``past_key_values`` and, afterwards, reads each row's
KV budget from ``policy.budgets(cache)`` for token accounting. Stage 2 (H2O, pruning/h2o.py) is one.

``--llm-pruning NAME``: a ``LayerDropper`` subclass, registered with ``register_llm_method``, for methods that drop
tokens between decoder layers at prefill (FastV, PyramidDrop, per-layer schedules). ``drop_tokens`` hooks the
decoder layers for one ``generate`` call; before every layer of the prefill it calls ``dropper.keep(view)`` with a
``LayerView`` (the hidden states entering the layer and those that entered the previous one, the layers themselves,
the rotary embeddings, which tokens are real and which are visual, each token's index in the prompt) and the
dropper answers which tokens go on (a [rows, length] bool mask) or None. The engine does the rest: it gathers the
kept tokens (left padding kept), their rotary embeddings and position ids, and gives the later layers a causal mask
over the kept tokens, so positions stay those of the full prompt (no re-rotation). Each decoder layer's KV cache
then holds what that layer saw; at every decode step the engine gives each shortened layer the mask of its own
keys. Attention stays SDPA: a method that needs attention weights recomputes only the rows it uses from
``view.layers[i].self_attn`` and ``view.previous_input`` (FastV: the attention the image tokens receive at layer K-1).
Per row, the engine counts the visual tokens entering every layer (``visual_per_layer``).

Two options for methods that need them (pass the decoder's modules to ``drop_tokens``): ``LayerView.norm`` is the
model's final norm (DART compares tokens after it), and a dropper with ``compact_positions = True`` renumbers the
kept tokens' positions 0, 1, 2, ... after each drop, as PyramidDrop does (prefill and decode steps; needs the
model's ``rotary_emb``). ``LayerDropper.check_model`` lets a method refuse a model its settings do not fit (a layer
index beyond the decoder) before anything runs.

Packed prefills (``pruning.packing``: one row holding every sample's real tokens back to back) keep the same
contract: the engine recognises the ``PackedPrefillCache`` in the layers' arguments, shows the dropper the usual
left-padded view (``LayerView.hidden`` unpacked from the packed row) and, after a drop, packs the kept tokens again
with their rotary embeddings, position ids and new sequence lengths (``cu_seq_lens_*`` for the packed attention),
and tells the cache the layer's own left-padded prompt, so decoding is the same padded batch as without packing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.cache_utils import Cache

from pruning import registry
from pruning.config import PruningConfig
from pruning.packing import PackedLayout, PackedPrefillCache
from pruning.registry import Param


# ---- --kv-pruning ------------------------------------------------------------------------------------------------
class KVCachePolicy:
    """A KV-cache policy for one ``generate`` call; subclasses override ``make_cache`` (and ``prepare``, ``budgets``)."""

    supports_beam_search = False

    def __init__(self, config: PruningConfig):
        self.config = config

    def prepare(self, model: nn.Module) -> None:
        """Once per model before generating (idempotent): e.g. wrap the attention backend to observe scores."""

    def make_cache(self, attention_mask: torch.Tensor) -> Cache:
        """The cache for a left-padded prompt of the merged inputs, attention_mask [rows, prompt_len]."""
        raise NotImplementedError

    def budgets(self, cache: Cache) -> list[int | None]:
        """Per row, the most KV entries a layer keeps (None = no limit): token accounting's kv_final."""
        raise NotImplementedError


def register_kv_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    description: str,
    check: Callable[[PruningConfig], None] | None = None,
    detail: Callable[[PruningConfig], str] | None = None,
) -> Callable[[type[KVCachePolicy]], type[KVCachePolicy]]:
    """Decorator: register a ``KVCachePolicy`` subclass as ``--kv-pruning NAME``."""
    return registry.method_decorator(
        "kv_pruning", name, params=params, description=description, check=check, detail=detail
    )


# ---- --llm-pruning -----------------------------------------------------------------------------------------------
@dataclass
class LayerView:
    """The prefill as it enters decoder layer ``index``; tensors are [rows, length(, ...)] for the current tokens."""

    index: int
    hidden: torch.Tensor  # [rows, length, hidden] entering layers[index]
    previous_input: torch.Tensor | None  # [rows, length, hidden] that entered layers[index - 1]; None at layer 0
    layers: Sequence[nn.Module]  # the decoder layers
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin) [rows, length, head_dim]
    valid: torch.Tensor  # [rows, length] bool: real tokens (False on left padding)
    visual: torch.Tensor  # [rows, length] bool: visual tokens
    prompt_index: torch.Tensor  # [rows, length] long: index of each token in the full (padded) prompt
    norm: nn.Module | None = None  # the model's final norm (before the LM head), when drop_tokens was given it


class LayerDropper:
    """Token dropping between decoder layers at prefill for one ``generate`` call; subclasses override ``keep``."""

    compact_positions = False  # True: kept tokens get positions 0, 1, 2, ... after a drop (needs rotary_emb)
    needs_norm = False  # True: keep() reads view.norm (drop_tokens must be given norm=)

    def __init__(self, config: PruningConfig):
        self.config = config

    def check_model(self, layers: Sequence[nn.Module]) -> None:
        """Raise ``PruningConfigError`` (naming the flag) when the settings do not fit these decoder layers."""

    def keep(self, view: LayerView) -> torch.Tensor | None:
        """Which tokens enter ``layers[view.index]`` and all later ones: [rows, length] bool, or None for all.

        Padding is never kept; each row's last token (the one whose logits start generation) must be kept.
        """
        raise NotImplementedError


def register_llm_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    description: str,
    check: Callable[[PruningConfig], None] | None = None,
    detail: Callable[[PruningConfig], str] | None = None,
) -> Callable[[type[LayerDropper]], type[LayerDropper]]:
    """Decorator: register a ``LayerDropper`` subclass as ``--llm-pruning NAME``."""
    return registry.method_decorator(
        "llm_pruning", name, params=params, description=description, check=check, detail=detail
    )


@runtime_checkable
class LayerPromptCache(Protocol):
    """A KV cache whose layers may each hold a different part of the prompt (stage 2's ``KVEvictionCache``): before
    a shortened layer runs its prefill, the engine says which of its keys are real, [rows, its length] bool."""

    def set_layer_prompt(self, layer_idx: int, key_valid: torch.Tensor) -> None: ...


class TokenDropping:
    """The engine behind ``drop_tokens``: the state of one prefill and its decode steps."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        dropper: LayerDropper,
        attention_mask: torch.Tensor,
        visual_mask: torch.Tensor,
        norm: nn.Module | None = None,
        rotary_emb: nn.Module | None = None,
    ):
        if attention_mask.shape != visual_mask.shape or attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and visual_mask {tuple(visual_mask.shape)} must both "
                "be [rows, prompt_len]"
            )
        self.layers = list(layers)
        self.dropper = dropper
        self.norm, self.rotary_emb = norm, rotary_emb
        self.valid = attention_mask.bool()
        self.visual = visual_mask.bool() & self.valid
        rows, length = self.valid.shape
        self.prompt_index = torch.arange(length, device=self.valid.device).expand(rows, length)
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self.position_ids: torch.Tensor | None = None
        self.previous_input: torch.Tensor | None = None
        self.shortened = False  # a drop happened: later layers get the engine's mask and embeddings
        self.layer_keys: dict[int, torch.Tensor] = {}  # shortened layer -> [rows, its prompt keys] bool
        self.removed = torch.zeros(rows, dtype=torch.long, device=self.valid.device)  # real tokens dropped so far
        self.layer_shift: dict[int, torch.Tensor] = {}  # compacted layer -> [rows] positions to subtract at decode
        self.counts: list[torch.Tensor] = []  # per layer: visual tokens entering it, [rows]
        self.decoding = False
        self.steps = 0
        self.packed: PackedPrefillCache | None = None  # the prefill arrives packed (pruning.packing)
        self.layout: PackedLayout | None = None  # packed: where the current tokens sit in the padded view
        self.packed_kwargs: dict[str, Any] = {}  # packed: the layer arguments for the current tokens

    def visual_per_layer(self) -> list[list[int]]:
        """Per row, the visual tokens that entered each decoder layer at prefill."""
        if not self.counts:
            raise RuntimeError("the prefill has not run through the hooked layers")
        return torch.stack(self.counts, dim=1).tolist()

    # ---- hook ------------------------------------------------------------------------------------------------
    def before_layer(
        self, index: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.decoding:
            self._decode_step(index, hidden, kwargs)
            return args, kwargs
        if index == 0:
            self._start(hidden, kwargs)
        packed_hidden = hidden
        if self.packed is not None:  # the dropper sees the padded view
            hidden = self.layout.unpack(hidden[0])
        view = LayerView(
            index,
            hidden,
            self.previous_input,
            self.layers,
            self.position_embeddings,
            self.valid,
            self.visual,
            self.prompt_index,
            self.norm,
        )
        keep = self.dropper.keep(view)
        if keep is not None:
            hidden = self._drop(keep, hidden)
            if self.packed is not None:
                packed_hidden = self._repack(hidden)
        self.counts.append(self.visual.sum(dim=1))
        if self.shortened:
            self.layer_keys[index] = self.valid
            cache = kwargs.get("past_key_values")
            if isinstance(cache, LayerPromptCache):  # e.g. stage 2: budgets from the tokens this layer sees
                cache.set_layer_prompt(index, self.valid)
            if self.dropper.compact_positions:
                self.layer_shift[index] = self.removed
            if self.packed is not None:
                kwargs = {**kwargs, **self.packed_kwargs}
                args, kwargs = _with_hidden(args, kwargs, packed_hidden)
            else:
                kwargs["attention_mask"] = _causal_mask(self.valid)
                kwargs["position_embeddings"] = self.position_embeddings
                if "position_ids" in kwargs:
                    kwargs["position_ids"] = self.position_ids
                args, kwargs = _with_hidden(args, kwargs, hidden)
        self.previous_input = hidden
        if index == len(self.layers) - 1:
            self.decoding, self.previous_input = True, None
        return args, kwargs

    def _start(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PackedPrefillCache):
            self._start_packed(cache, hidden, kwargs)
        elif hidden.shape[:2] != self.valid.shape:
            raise ValueError(
                f"the prefill has {tuple(hidden.shape[:2])} tokens but the masks given to drop_tokens are "
                f"{tuple(self.valid.shape)}: build them from the inputs the model sees"
            )
        else:
            rows = hidden.shape[0]
            cos, sin = kwargs["position_embeddings"]
            self.position_embeddings = (cos.expand(rows, -1, -1), sin.expand(rows, -1, -1))
            position_ids = kwargs.get("position_ids")
            self.position_ids = None if position_ids is None else position_ids.expand(rows, -1)
        if self.dropper.compact_positions:
            if self.position_ids is None:  # the model numbers the padded prompt 0..L-1
                self.position_ids = self.prompt_index.clone()
            first = self.valid.long().argmax(dim=1, keepdim=True)  # each row's first real token
            self.first_position = self.position_ids.gather(1, first)  # [rows, 1]

    def _start_packed(self, cache: PackedPrefillCache, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """The prefill is one packed row: keep the padded view of positions (pads 0), as a padded prefill has it."""
        layout = cache.layout
        if not torch.equal(layout.valid, self.valid) or hidden.shape[:2] != (1, layout.width):
            raise ValueError(
                f"the packed prefill has {tuple(hidden.shape[:2])} tokens in the layout of a {tuple(layout.valid.shape)}"
                f" mask, but the masks given to drop_tokens are {tuple(self.valid.shape)}: build them from the inputs "
                "the model sees"
            )
        self.packed, self.layout = cache, layout
        cos, sin = kwargs["position_embeddings"]
        self.position_embeddings = (layout.unpack(cos[0]), layout.unpack(sin[0]))
        position_ids = kwargs.get("position_ids")
        self.position_ids = None if position_ids is None else layout.unpack(position_ids[0])

    def _repack(self, hidden: torch.Tensor) -> torch.Tensor:
        """After a drop on the padded view: the kept tokens packed again, and the arguments later layers get."""
        layout = self.layout = PackedLayout.from_mask(self.valid, self.layout.multiple)
        self.packed_kwargs = {
            "attention_mask": None,
            "position_embeddings": tuple(layout.pack(t)[None] for t in self.position_embeddings),
            "position_ids": None if self.position_ids is None else layout.pack(self.position_ids)[None],
            **layout.attention_kwargs(),
        }
        return layout.pack(hidden)[None]

    def _drop(self, keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Gather the kept tokens of every row to the right end (left padding), in their order."""
        if keep.shape != self.valid.shape or keep.dtype != torch.bool:
            raise ValueError(
                f"{type(self.dropper).__name__}.keep returned {keep.dtype} {tuple(keep.shape)}; expected a bool mask "
                f"{tuple(self.valid.shape)}"
            )
        keep = keep & self.valid
        real = self.valid.sum(dim=1)
        if not bool(keep[:, -1].all()):
            raise ValueError(f"{type(self.dropper).__name__}.keep dropped a row's last token, which generation needs")
        counts = keep.sum(dim=1)
        length = int(counts.max())
        positions = torch.arange(keep.shape[1], device=keep.device)
        order = torch.sort(torch.where(keep, positions, -1), dim=1).values[:, -length:]  # kept last, in order
        new_valid = torch.arange(length, device=keep.device)[None, :] >= length - counts[:, None]
        index = order.clamp(min=0)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
            return torch.gather(tensor, 1, expanded)

        self.valid, self.visual = new_valid, take(self.visual) & new_valid
        self.prompt_index = take(self.prompt_index)
        hidden = take(hidden)
        if self.dropper.compact_positions:  # the kept real tokens of a row are numbered on from its first position
            rank = (torch.cumsum(new_valid.long(), dim=1) - 1).clamp(min=0)
            self.position_ids = self.first_position + rank
            self.position_embeddings = self.rotary_emb(hidden, self.position_ids)
            self.removed = self.removed + real - counts
        else:
            self.position_embeddings = tuple(take(t) for t in self.position_embeddings)
            if self.position_ids is not None:
                self.position_ids = take(self.position_ids)
        self.shortened = True
        return hidden

    def _decode_step(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if hidden.shape[1] != 1:
            raise ValueError(
                "token dropping between LLM layers takes one new token per forward after the prompt (use_cache=True;"
                " assisted decoding and chunked prefill are not supported)"
            )
        if index == 0:
            self.steps += 1
        keys = self.layer_keys.get(index)
        if keys is not None:  # a shortened layer: its own keys, then every generated token
            new = torch.ones(keys.shape[0], self.steps, dtype=torch.bool, device=keys.device)
            kwargs["attention_mask"] = torch.cat([keys, new], dim=1)[:, None, None, :]
        shift = self.layer_shift.get(index)
        if shift is not None:  # compacted positions: this layer's prompt was renumbered without the dropped tokens
            if kwargs.get("position_ids") is None:
                raise ValueError("compact_positions needs the decoder layers to receive position_ids while decoding")
            position_ids = kwargs["position_ids"].expand(hidden.shape[0], -1) - shift[:, None]
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = self.rotary_emb(hidden, position_ids)


def _with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """[rows, 1, length, length] bool: a query sees the real tokens up to itself; a pad query sees itself (no row is
    empty, so no NaN reaches the values of later layers)."""
    length = valid.shape[1]
    positions = torch.arange(length, device=valid.device)
    causal = positions[None, :] <= positions[:, None]  # [query, key]
    allowed = causal[None] & valid[:, None, :]
    return (allowed | torch.eye(length, dtype=torch.bool, device=valid.device)[None])[:, None]


@contextmanager
def drop_tokens(
    layers: Sequence[nn.Module],
    dropper: LayerDropper,
    attention_mask: torch.Tensor,
    visual_mask: torch.Tensor,
    *,
    norm: nn.Module | None = None,
    rotary_emb: nn.Module | None = None,
) -> Iterator[TokenDropping]:
    """Hook ``layers`` (an LLM's decoder layers, Llama-style: hidden states first, then ``attention_mask``,
    ``position_embeddings`` and ``position_ids`` as keywords) for one ``generate`` call on a left-padded prompt
    (attention_mask and visual_mask [rows, prompt_len] of the inputs the model sees). SDPA attention only: the
    engine's masks are boolean. ``norm`` (the final norm) and ``rotary_emb`` (the decoder's rotary embedding,
    called as ``rotary_emb(hidden, position_ids)``) are needed by droppers that set ``needs_norm`` /
    ``compact_positions``."""
    layers = list(layers)
    implementation = getattr(getattr(layers[0].self_attn, "config", None), "_attn_implementation", None)
    if implementation not in ("sdpa", "kv_eviction_sdpa"):  # the latter: stage 2's wrapper around SDPA
        raise ValueError(
            f"token dropping between LLM layers (--llm-pruning) needs SDPA attention, found {implementation!r}; load "
            "the model with attn_implementation='sdpa'"
        )
    name = type(dropper).__name__
    if dropper.needs_norm and norm is None:
        raise ValueError(f"{name} reads the model's final norm: pass norm= to drop_tokens")
    if dropper.compact_positions and rotary_emb is None:
        raise ValueError(f"{name} renumbers positions after a drop: pass rotary_emb= to drop_tokens")
    dropper.check_model(layers)
    state = TokenDropping(layers, dropper, attention_mask, visual_mask, norm, rotary_emb)
    handles = [
        layer.register_forward_pre_hook(partial(state.before_layer, index), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


# ---- the methods that change nothing ---------------------------------------------------------------------------------
registry.register("kv_pruning", registry.NONE, None, description="No KV eviction: the model's own cache.")
registry.register("llm_pruning", registry.NONE, None, description="No token dropping inside the LLM.")
