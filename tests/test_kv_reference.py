"""KVEvictionCache against a plain masked reference of the H2O rules.

The reference never deletes anything: it runs a plain DynamicCache and an eager attention that masks, per head, the
keys the rules have evicted. It is written for clarity (Python loops over samples and heads), not speed. The real
cache must produce the same greedy tokens and keep the same absolute positions in every layer and KV head.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from pruning.h2o import enable_kv_eviction
from pruning.kv_cache import KVEvictionCache
from tests.test_kv_cache import generate, h2o, left_padded, tiny_llm

REFERENCE = "h2o_masked_reference"


class MaskedH2O:
    """Evicted-key masks over the full padded timeline, one [batch, kv_heads, keys] bool tensor per layer."""

    def __init__(self, mask: torch.Tensor, heavy: list[int], recent: list[int]):
        self.real = mask.bool()
        self.lengths = self.real.sum(-1).tolist()
        self.heavy, self.recent = heavy, recent
        self.keep: dict[int, torch.Tensor] = {}
        self.score: dict[int, torch.Tensor] = {}

    def prefill(self, layer: int, score: torch.Tensor) -> None:
        batch, heads, width = score.shape
        keep = self.real[:, None, :].expand(batch, heads, width).clone()
        for b in range(batch):
            budget = self.heavy[b] + self.recent[b]
            if self.lengths[b] <= budget:
                continue
            real = [j for j in range(width) if self.real[b, j]]
            window = real[len(real) - self.recent[b] :] if self.recent[b] else []
            others = real[: len(real) - self.recent[b]]
            for h in range(heads):
                best = sorted(others, key=lambda j: -score[b, h, j].item())[: self.heavy[b]]
                keep[b, h] = False
                keep[b, h, window + best] = True
        self.keep[layer], self.score[layer] = keep, score

    def decode(self, layer: int, probs: torch.Tensor) -> None:
        keep, score = self.keep[layer], self.score[layer] + probs
        newest = keep.shape[-1] - 1
        for b in range(keep.shape[0]):
            budget = self.heavy[b] + self.recent[b]
            for h in range(keep.shape[1]):
                if int(keep[b, h].sum()) <= budget:
                    continue
                old = [j for j in range(newest + 1) if keep[b, h, j] and j <= newest - self.recent[b]]
                keep[b, h, min(old, key=lambda j: score[b, h, j].item())] = False
        self.score[layer] = score

    def mask_for_decode(self, layer: int) -> torch.Tensor:
        keep = self.keep[layer]
        self.keep[layer] = torch.cat([keep, keep.new_ones(*keep.shape[:2], 1)], dim=-1)
        self.score[layer] = torch.cat([self.score[layer], self.score[layer].new_zeros(*keep.shape[:2], 1)], dim=-1)
        return self.keep[layer]

    def positions(self, layer: int) -> list[list[list[int]]]:
        pads = [self.real.shape[1] - p for p in self.lengths]
        keep = self.keep[layer]
        return [
            [[j - pads[b] for j in range(keep.shape[-1]) if keep[b, h, j]] for h in range(keep.shape[1])]
            for b in range(keep.shape[0])
        ]


def masked_eager_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention that ignores the model's mask and builds its own from the reference's keep masks."""
    state: MaskedH2O = module.h2o_reference
    layer, groups = module.layer_idx, module.num_key_value_groups
    batch, heads, length, _ = query.shape
    width = key.shape[2]
    keys, values = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = (query @ keys.transpose(-1, -2)).float() * scaling
    if length > 1:  # prefill: causal over the real tokens
        allowed = torch.ones(width, width, dtype=torch.bool).tril()[None, None] & state.real[:, None, None, :]
    else:
        allowed = state.mask_for_decode(layer).repeat_interleave(groups, dim=1)[:, :, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)  # pad queries: zeros
    output = (probs.to(value.dtype) @ values).transpose(1, 2).contiguous()
    per_kv_head = probs.view(batch, heads // groups, groups, length, width).sum(dim=(2, 3))
    if length > 1:
        state.prefill(layer, per_kv_head)
    else:
        state.decode(layer, per_kv_head)
    return output, None


AttentionInterface.register(REFERENCE, masked_eager_attention)
AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def run_reference(model, ids, mask, heavy, recent, new_tokens):
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = REFERENCE
    state = MaskedH2O(mask, heavy, recent)
    for layer in reference.model.layers:
        layer.self_attn.h2o_reference = state
    out = generate(reference, ids, mask, DynamicCache(config=reference.config), new_tokens)
    return out.sequences, state


def run_cache(model, ids, mask, config, new_tokens):
    enabled = enable_kv_eviction(copy.deepcopy(model))
    cache = KVEvictionCache(config, mask)
    out = generate(enabled, ids, mask, cache, new_tokens)
    return out.sequences, cache


CASES = {
    # name: (model kind, kv heads, prompt lengths, config, per-sample (heavy, recent) for the reference)
    "llama-mha-quarter": ("llama", 4, [16], h2o(heavy_ratio=0.25, recent_ratio=0.25), [(4, 4)]),
    "llama-gqa-absolute": ("llama", 2, [14], h2o(heavy_budget=3, recent_budget=2), [(3, 2)]),
    "llama-gqa-padded": ("llama", 2, [16, 11, 7], h2o(heavy_ratio=0.25, recent_ratio=0.25), [(4, 4), (3, 2), (2, 1)]),
    # one budget for all: the short prompts start under it, so packed layers mix evicting and growing samples
    "llama-gqa-absolute-padded": ("llama", 2, [14, 3, 8], h2o(heavy_budget=3, recent_budget=2), [(3, 2)] * 3),
    "mistral-gqa-half": ("mistral", 2, [12, 9], h2o(), [(6, 6), (5, 4)]),
    "llama-no-recent": ("llama", 4, [13, 10], h2o(heavy_ratio=0.5, recent_ratio=0.0), [(6, 0), (5, 0)]),
    "llama-recent-only": ("llama", 2, [12], h2o(heavy_ratio=0.0, recent_ratio=0.5), [(0, 6)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cache_matches_the_masked_reference(case):
    kind, kv_heads, lengths, config, budgets = CASES[case]
    model = tiny_llm(kind, kv_heads, seed=len(case))
    ids, mask = left_padded(lengths, seed=len(case))
    new_tokens = 10
    expected, state = run_reference(model, ids, mask, [h for h, _ in budgets], [r for _, r in budgets], new_tokens)
    got, cache = run_cache(model, ids, mask, config, new_tokens)
    assert torch.equal(got, expected)
    assert cache.budgets() == [h + r for h, r in budgets]
    for layer in range(model.config.num_hidden_layers):
        assert cache.kept_positions(layer) == state.positions(layer), f"layer {layer}"
    assert cache.kv_lengths() == [min(p + new_tokens - 1, h + r) for p, (h, r) in zip(lengths, budgets)]


def test_padded_batch_equals_batch_of_one_runs():
    model = tiny_llm("llama", 2, seed=5)
    lengths, new_tokens = [15, 9, 12], 9
    ids, mask = left_padded(lengths, seed=5)
    config = h2o(heavy_ratio=0.25, recent_ratio=0.25)
    batched, cache = run_cache(model, ids, mask, config, new_tokens)
    width = ids.shape[1]
    for row, length in enumerate(lengths):
        alone, single = run_cache(
            model, ids[row : row + 1, width - length :], mask[row : row + 1, width - length :], config, new_tokens
        )
        assert torch.equal(batched[row, width - length :], alone[0])
        assert single.kv_lengths() == [cache.kv_lengths()[row]]
        for layer in range(2):
            assert single.kept_positions(layer)[0] == cache.kept_positions(layer)[row]
