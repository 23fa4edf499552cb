"""Stage 2: heavy-hitter KV eviction (paper 3.3, H2O generation semantics) as a transformers ``Cache``.

Per layer and per KV head, for a prompt of P tokens:

* the prefill runs full causal attention; key j's score s_j is the sum over all prompt queries of the softmax
  probability on j (summed over the query heads of a GQA group);
* ``recent = floor(recent_ratio * P)``, ``budget = floor((heavy_ratio + recent_ratio) * P)`` (or the absolute
  ``recent_budget`` / ``heavy_budget + recent_budget``);
* if P > budget, the prefill keeps the last ``recent`` tokens plus the ``budget - recent`` best-scored others;
* each decode step appends the new key, adds the new query's probabilities to s, and, if the cache holds more than
  ``budget`` keys, evicts the lowest-scored key outside the last ``recent`` positions.

Keys keep their RoPE rotation and positions continue from the absolute position, so ``get_seq_length()`` reports the
logical length while the tensors stay capped. The scores come from the attention function installed by
``pruning.h2o.enable_kv_eviction``; this module only holds state and applies the rules.

Layout of one layer: ``keys``/``values`` ``[batch, kv_heads, slots, head_dim]``; ``scores`` and ``positions``
``[batch, kv_heads, slots]``; ``valid`` ``[batch, slots]``. Every KV head of a sample holds the same number of keys,
so validity is per sample. Until the first eviction a layer is *pristine*: its slots are exactly the padded
timeline of a plain ``DynamicCache`` and attention uses the model's own mask, so outputs match a plain cache bit for
bit. The first eviction *packs* the layer: the kept keys of each head move to slots ``0 .. count-1`` in position
order, and from then on a decode step writes its key to slot ``count`` and, when over budget, moves it into the
evicted slot, so the tensors never exceed ``budget + 1`` slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pruning.config import PruningConfig

BEAM_SEARCH_ERROR = (
    "beam search is not supported with KV eviction: each beam would need its own eviction history. "
    "Use greedy or sampling (num_beams=1)."
)


def kv_budget(config: PruningConfig, prompt_length: int) -> tuple[int, int]:
    """(budget, recent) for one sample: the most keys a layer keeps per head, and how many of them are the last ones.

    Ratios are read as the decimals the user wrote (``Fraction(str(r))``), so floor(0.29 * 100) is 29 and not the 28
    that binary floating point gives.
    """
    if prompt_length < 0:
        raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
    if config.heavy_budget is not None:
        return config.heavy_budget + config.recent_budget, config.recent_budget
    heavy, recent = Fraction(str(config.heavy_ratio)), Fraction(str(config.recent_ratio))
    return math.floor((heavy + recent) * prompt_length), math.floor(recent * prompt_length)


@dataclass
class _Plan:
    """Per-sample budgets, shared by all layers of one cache; fixed by the prompt's attention mask."""

    prompt_valid: torch.Tensor  # [batch, prompt_len] bool, left padding
    prompt_lengths: list[int]
    budgets: list[int]
    recents: list[int]
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(budgets, recents) as [batch] tensors on `device`, made once: decode steps then need no host copies."""
        if device not in self._on_device:
            self._on_device[device] = (self.tensor(self.budgets, device), self.tensor(self.recents, device))
        return self._on_device[device]

    @property
    def batch_size(self) -> int:
        return len(self.prompt_lengths)

    @property
    def padded_length(self) -> int:
        return self.prompt_valid.shape[1]

    def tensor(self, values: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=device)


class KVEvictionLayer(CacheLayerMixin):
    """One attention layer's capped KV cache; see the module docstring for the layout and the rules."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, plan_source: KVEvictionCache, layer_idx: int = 0):
        super().__init__()
        self._source = plan_source
        self.layer_idx = layer_idx
        self._plan: _Plan | None = None  # the cache's plan, or this layer's own when it saw fewer prompt tokens
        self.scores: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # None while pristine: slot index == timeline position
        self.valid: torch.Tensor | None = None
        self.packed = False
        self.length = 0  # logical length: padded prompt + tokens appended since
        self.counts: list[int] = []  # keys held per head, per sample
        self._counts_t: torch.Tensor | None = None  # same, on device (packed layers only)
        self._rows: torch.Tensor | None = None  # arange(batch) and arange(kv_heads) for indexed writes (packed only)
        self._heads: torch.Tensor | None = None
        self.awaiting: str | None = None  # "prefill" / "decode": update() ran, the attention scores have not

    # ---- CacheLayerMixin -----------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.awaiting is not None:
            raise RuntimeError(
                "KVEvictionCache was updated but never received attention scores: call "
                "pruning.h2o.enable_kv_eviction(model) before generating with it"
            )
        if not self.is_initialized:
            return self._start(key_states, value_states)
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"KVEvictionCache takes one new token per forward after the prompt, got {key_states.shape[-2]}: "
                "chunked prefill, assisted and speculative decoding are not supported with KV eviction"
            )
        if self.packed:
            self._write_packed(key_states, value_states)
        else:
            batch, heads = key_states.shape[:2]
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, 1)], dim=-1)
            self.valid = torch.cat([self.valid, self.valid.new_ones(batch, 1)], dim=-1)
        self.counts = [count + 1 for count in self.counts]
        self.length += 1
        self.awaiting = "decode"
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.scores = self.positions = self.valid = None
        self._counts_t = self._rows = self._heads = None
        self.is_initialized = self.packed = False
        self.length, self.counts, self.awaiting = 0, [], None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(BEAM_SEARCH_ERROR)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError(BEAM_SEARCH_ERROR)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("KVEvictionCache cannot drop samples from its batch (contrastive search is not supported)")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("KVEvictionCache cannot be cropped: evicted keys cannot be restored (no assisted decoding)")

    # ---- what the attention function reads -------------------------------------------------------------------
    @property
    def key_valid(self) -> torch.Tensor:
        """[batch, slots] bool: which slots hold a key (the same for every KV head of a sample)."""
        return self.valid

    @property
    def fully_occupied(self) -> bool:
        """True when no slot is empty, so attention needs no mask."""
        return self.packed and min(self.counts) == self.keys.shape[-2]

    # ---- rules ------------------------------------------------------------------------------------------
    def observe_prefill(self, column_scores: torch.Tensor) -> None:
        """Record the prompt's accumulated scores [batch, kv_heads, prompt_len] and evict down to the budgets."""
        self._expect("prefill")
        plan = self._plan
        self.scores = column_scores.float()
        over = [p > b for p, b in zip(plan.prompt_lengths, plan.budgets)]
        if any(over):
            self._pack(self._prefill_keep(over), [min(p, b) for p, b in zip(plan.prompt_lengths, plan.budgets)])

    def observe_decode(self, row_probs: torch.Tensor) -> None:
        """Add the new query's probabilities [batch, kv_heads, slots] and evict one key where over budget."""
        self._expect("decode")
        self.scores += row_probs.float()
        plan = self._plan
        over = [count > budget for count, budget in zip(self.counts, plan.budgets)]
        if not any(over):
            return
        if not self.packed:
            batch, heads = self.keys.shape[:2]
            self._pack(self.valid[:, None, :].expand(batch, heads, -1), self.counts)
        self._evict_one(over)

    def _expect(self, phase: str) -> None:
        if self.awaiting != phase:
            raise RuntimeError(f"KVEvictionLayer expected scores for a {self.awaiting} step, got {phase} scores")
        self.awaiting = None

    def _start(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.lazy_initialization(key_states, value_states)
        plan = self._source.bind(key_states.shape[0], key_states.shape[-2], key_states.device, self.layer_idx)
        self._plan = plan
        self.keys, self.values = key_states, value_states
        self.valid = plan.prompt_valid.clone()
        self.length = plan.padded_length
        self.counts = list(plan.prompt_lengths)
        self.awaiting = "prefill"
        return self.keys, self.values

    def _prefill_keep(self, over: list[bool]) -> torch.Tensor:
        """[batch, kv_heads, prompt_len] bool: last `recent` tokens + top-`heavy` scores among the other real ones."""
        plan = self._plan
        device, length = self.scores.device, self.length
        recent = plan.tensor(plan.recents, device)
        heavy_counts = [b - r for b, r in zip(plan.budgets, plan.recents)]
        window = torch.arange(length, device=device)[None, :] >= length - recent[:, None]  # left padding
        candidates = self.valid & ~window
        keep = (self.valid & window)[:, None, :].expand_as(self.scores).clone()
        top = max((h for h, o in zip(heavy_counts, over) if o), default=0)
        if top > 0:
            ranked = self.scores.masked_fill(~candidates[:, None, :], -math.inf).topk(top, dim=-1).indices
            chosen = torch.arange(top, device=device)[None, None, :] < plan.tensor(heavy_counts, device)[:, None, None]
            # OR, so that a sample with fewer candidates than `top` never unkeeps its window through a -inf rank
            keep.scatter_(-1, ranked, chosen.expand_as(ranked) | keep.gather(-1, ranked))
        under = ~plan.tensor(over, device).bool()
        return torch.where(under[:, None, None], self.valid[:, None, :], keep)

    def _pack(self, keep: torch.Tensor, counts: list[int]) -> None:
        """Move each head's kept keys to slots 0..count-1 in position order; drop the slots nobody needs."""
        batch, heads, slots = keep.shape
        device = keep.device
        width = max(counts)
        order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # kept slots first
        if self.positions is None:
            self.positions = torch.arange(slots, device=device).expand(batch, heads, slots)
        self._rows = torch.arange(batch, device=device)
        self._heads = torch.arange(heads, device=device)
        index = (self._rows[:, None, None], self._heads[None, :, None], order)  # indexing: see _write_packed
        self.keys, self.values = self.keys[index], self.values[index]
        self.scores, self.positions = self.scores[index], self.positions[index]
        self._counts_t = torch.tensor(counts, dtype=torch.long, device=device)
        self.valid = torch.arange(width, device=device)[None, :] < self._counts_t[:, None]
        self.counts = list(counts)
        self.packed = True

    def _write_packed(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Put the new key in slot `count` of its sample, growing the tensors by one slot when some sample is full.

        Writes use indexed assignment, not ``scatter_``: on CPU a half-precision ``scatter_`` copies the whole
        destination tensor (22 ms per call for 8 x 32 x 269 x 128 bf16 keys, 0.04 ms indexed), a cost that grew with
        the batch and made bf16 decode more than 2x slower than a plain cache at batch 8.
        """
        if max(self.counts) == self.keys.shape[-2]:
            self.keys = _grow(self.keys, 2)
            self.values = _grow(self.values, 2)
            self.scores = _grow(self.scores, 2)
            self.positions = _grow(self.positions, 2)
            self.valid = _grow(self.valid, 1)
        rows, slot = self._rows, self._counts_t
        self.keys[rows, :, slot] = key_states[:, :, 0]
        self.values[rows, :, slot] = value_states[:, :, 0]
        self.scores[rows, :, slot] = 0.0
        self.positions[rows, :, slot] = self.length
        self.valid[rows, slot] = True
        self._counts_t += 1

    def _evict_one(self, over: list[bool]) -> None:
        """For each over-budget sample and head, move the newest key into the slot of the lowest-scored old one.

        One batched argmin and one indexed move per tensor for the whole batch; samples under budget move their
        newest key onto itself. No host sync: `over` (host) and `over_t` (device) are the same, kept on both sides.
        """
        plan = self._plan
        budgets, recents = plan.on(self.scores.device)
        rows, heads = self._rows[:, None], self._heads[None, :]
        newest = (self._counts_t - 1)[:, None].expand(-1, heads.shape[1])  # [batch, kv_heads]
        cutoff = (self.length - 1) - recents  # newest position minus the recent window
        candidates = self.valid[:, None, :] & (self.positions <= cutoff[:, None, None])
        victim = self.scores.masked_fill(~candidates, math.inf).argmin(dim=-1)
        over_t = self._counts_t > budgets  # the same as `over`, without a host-to-device copy
        victim = torch.where(over_t[:, None], victim, newest)  # under budget: move onto itself
        for tensor in (self.keys, self.values, self.scores, self.positions):
            tensor[rows, heads, victim] = tensor[rows, heads, newest]
        self.valid[self._rows, newest[:, 0]] = ~over_t
        self._counts_t -= over_t.long()
        self.counts = [count - 1 if o else count for count, o in zip(self.counts, over)]

    # ---- accounting ---------------------------------------------------------------------------------------
    def kept_positions(self) -> list[list[list[int]]]:
        """Sorted positions (0 = the sample's first real prompt token) of the keys held, per sample and KV head."""
        plan = self._plan
        batch, heads, slots = self.keys.shape[0], self.keys.shape[1], self.keys.shape[-2]
        positions = self.positions if self.positions is not None else torch.arange(slots).expand(batch, heads, slots)
        valid = self.valid.cpu()
        positions = positions.cpu()
        result = []
        for b in range(batch):
            pad = plan.padded_length - plan.prompt_lengths[b]
            result.append([sorted((positions[b, h][valid[b]] - pad).tolist()) for h in range(heads)])
        return result


def _grow(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[dim] = 1
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


class KVEvictionCache(Cache):
    """Heavy-hitter KV cache for one ``generate`` call on a left-padded batch.

    Args:
        config: the pruning config; ``kv_pruning`` must be ``"h2o"``. Budgets come from ``heavy_budget`` /
            ``recent_budget`` when set, else from the ratios times each sample's own prompt length.
        attention_mask: ``[batch, prompt_len]`` mask of the inputs the model sees at prefill (for LLaVA: after image
            tokens are expanded), left padded. ``None`` means no padding.

    Build a fresh cache per ``generate`` call, and call ``pruning.h2o.enable_kv_eviction(model)`` once per model.
    """

    def __init__(self, config: PruningConfig, attention_mask: torch.Tensor | None = None):
        if not isinstance(config, PruningConfig):
            raise TypeError(f"KVEvictionCache needs a PruningConfig, got {type(config).__name__}")
        if config.kv_pruning != "h2o":
            raise ValueError(f"KVEvictionCache needs kv_pruning='h2o', got kv_pruning={config.kv_pruning!r}")
        if attention_mask is not None:
            _check_left_padded(attention_mask)
        super().__init__(layers=[])
        self.config = config
        self._mask = attention_mask
        self.plan: _Plan | None = None
        self._layer_prompts: dict[int, torch.Tensor] = {}  # set_layer_prompt: layers that saw part of the prompt

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(KVEvictionLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def set_layer_prompt(self, layer_idx: int, key_valid: torch.Tensor) -> None:
        """Layer ``layer_idx`` sees only part of the prompt (token dropping between decoder layers, pruning.llm):
        ``key_valid`` [batch, its prompt length], left padded. Its budgets come from its own prompt lengths; the
        accounting (``budgets``, ``kv_lengths``) keeps describing the full prompt."""
        self._layer_prompts[layer_idx] = key_valid

    def bind(self, batch_size: int, prompt_length: int, device: torch.device, layer_idx: int = 0) -> _Plan:
        """Fix the per-sample budgets at the first prefill; later layers check they see the same prompt, unless
        ``set_layer_prompt`` gave them one of their own."""
        own = self._layer_prompts.get(layer_idx)
        if own is not None:
            if tuple(own.shape) != (batch_size, prompt_length):
                raise ValueError(
                    f"layer {layer_idx} was given a prompt of {tuple(own.shape)} but runs {batch_size}x{prompt_length}"
                )
            if self.plan is None and self._mask is not None:
                self.plan = self._make_plan(self._mask.to(device=device, dtype=torch.bool))
            return self._make_plan(own.to(device=device, dtype=torch.bool))
        if self.plan is None:
            mask = self._mask
            if mask is None:
                mask = torch.ones(batch_size, prompt_length, dtype=torch.bool)
            if mask.shape[0] != batch_size:
                raise ValueError(
                    f"KVEvictionCache was built for a batch of {mask.shape[0]} but the model runs {batch_size} "
                    f"sequences; {BEAM_SEARCH_ERROR} num_return_sequences > 1 needs the cache built from the "
                    "attention mask repeated per sequence"
                )
            if mask.shape[1] != prompt_length:
                raise ValueError(
                    f"KVEvictionCache attention_mask has {mask.shape[1]} columns but the prompt has {prompt_length} "
                    "tokens: build the cache from the attention mask of the inputs the model sees (for LLaVA, after "
                    "image tokens are expanded)"
                )
            self.plan = self._make_plan(mask.to(device=device, dtype=torch.bool))
        elif (batch_size, prompt_length) != (self.plan.batch_size, self.plan.padded_length):
            raise ValueError(
                f"layers disagree on the prompt: {batch_size}x{prompt_length} vs "
                f"{self.plan.batch_size}x{self.plan.padded_length}; a KVEvictionCache serves one generate call"
            )
        return self.plan

    def _make_plan(self, mask: torch.Tensor) -> _Plan:
        lengths = mask.sum(dim=-1).tolist()
        budgets = [kv_budget(self.config, p) for p in lengths]
        return _Plan(mask, lengths, [b for b, _ in budgets], [r for _, r in budgets])

    # ---- accounting ---------------------------------------------------------------------------------------
    def prompt_lengths(self) -> list[int]:
        """P per sample: its non-pad prompt tokens."""
        return list(self._require_plan().prompt_lengths)

    def budgets(self) -> list[int]:
        """The KV budget per sample (keys per layer and head)."""
        return list(self._require_plan().budgets)

    def kv_lengths(self, generated: Sequence[int] | None = None) -> list[int]:
        """KV entries per layer per sample (pads excluded): the paper's "total tokens".

        Without ``generated``: what the cache holds now. After ``generate`` returned G new tokens that is
        ``min(P + G - 1, budget)``, because the last sampled token is never fed back through the model.
        With ``generated`` (each sample's own new-token count, e.g. up to its EOS): what a batch-of-one run of that
        sample would hold, ``min(P + G - 1, budget)``, which is what a sample that stopped early should report.
        """
        plan = self._require_plan()
        if generated is None:
            return list(self.layers[0].counts)
        if len(generated) != plan.batch_size:
            raise ValueError(f"generated has {len(generated)} entries for a batch of {plan.batch_size}")
        if any(g < 1 for g in generated):
            raise ValueError(f"generated lengths must be >= 1, got {list(generated)}")
        return [min(p + g - 1, b) for p, g, b in zip(plan.prompt_lengths, generated, plan.budgets)]

    def kept_positions(self, layer_idx: int) -> list[list[list[int]]]:
        """Positions held by layer ``layer_idx``, per sample and KV head (0 = first real prompt token)."""
        self._require_plan()
        return self.layers[layer_idx].kept_positions()

    def _require_plan(self) -> _Plan:
        if self.plan is None:
            raise RuntimeError("KVEvictionCache has not seen a prompt yet")
        return self.plan


def _check_left_padded(mask: torch.Tensor) -> None:
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, prompt_len], got shape {tuple(mask.shape)}")
    real = mask.bool()
    if not bool((real[:, 1:] >= real[:, :-1]).all()):
        raise ValueError("attention_mask must be left-padded (zeros then ones in every row) for KV eviction")
