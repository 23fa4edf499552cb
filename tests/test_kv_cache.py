"""KVEvictionCache on tiny random Llama / Mistral models: equivalence with DynamicCache, budgets, accounting, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from pruning.config import PruningConfig, PruningConfigError, resolve_pruning
from pruning.h2o import decode_row_probs, enable_kv_eviction, prefill_column_scores
from pruning.kv_cache import KVEvictionCache, kv_budget

VOCAB = 128


def tiny_llm(kind: str = "llama", kv_heads: int = 4, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """hidden 64, 4 heads, 2 layers; a wide init so attention is far from uniform and eviction choices matter."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        initializer_range=0.15,
        attn_implementation=attn,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def h2o(**kwargs) -> PruningConfig:
    return PruningConfig(kv_pruning="h2o", **kwargs)


def generate(model, ids, mask, cache, new_tokens: int, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        do_sample=kwargs.pop("do_sample", False),
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


# ---- budgets ----------------------------------------------------------------------------------------------
def test_ratio_budgets_follow_the_prompt_length():
    assert kv_budget(h2o(), 13) == (13, 6)  # paper 0.5 / 0.5: budget = P exactly, odd P included
    assert kv_budget(h2o(heavy_ratio=0.1, recent_ratio=0.1), 100) == (20, 10)
    assert kv_budget(h2o(heavy_ratio=0.0, recent_ratio=0.29), 100) == (29, 29)  # float 0.29 * 100 is 28.999...
    assert kv_budget(h2o(heavy_ratio=0.25, recent_ratio=0.25), 7) == (3, 1)


def test_absolute_budgets_ignore_the_prompt_length():
    config = h2o(heavy_budget=3, recent_budget=2)
    assert kv_budget(config, 5) == (5, 2)
    assert kv_budget(config, 500) == (5, 2)


def test_absolute_budgets_that_keep_nothing_are_refused():
    with pytest.raises(PruningConfigError, match="heavy_budget 0 and recent_budget 0 would evict every key"):
        h2o(heavy_budget=0, recent_budget=0)
    # also when the checkpoint's budgets meet a command line that turns stage 2 on
    with pytest.raises(PruningConfigError, match="evict every key"):
        resolve_pruning({"heavy_budget": 0, "recent_budget": 0}, {"kv_pruning": "h2o"})
    assert kv_budget(h2o(heavy_budget=0, recent_budget=1), 50) == (1, 1)  # the newest key alone is a budget
    assert kv_budget(h2o(heavy_budget=1, recent_budget=0), 50) == (1, 0)


# ---- score kernels ----------------------------------------------------------------------------------------
def naive_column_scores(query, key, valid, scaling):
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1)
    length = query.shape[2]
    logits = (query @ keys.transpose(-1, -2)).double() * scaling
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    per_head = probs.sum(dim=2)  # over queries
    return per_head.view(key.shape[0], key.shape[1], groups, length).sum(dim=2)


@pytest.mark.parametrize("block_elements", [1, 500, 2000, None])  # (heads, queries) per block: 1x1, 1x3, 2x5, 2x5
def test_prefill_column_scores_match_the_full_softmax(block_elements):
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :7] = False
    scores = prefill_column_scores(query, key, valid, 0.5, block_elements=block_elements)
    torch.testing.assert_close(scores.double(), naive_column_scores(query, key, valid, 0.5), atol=1e-5, rtol=1e-5)
    assert torch.all(scores[1, :, :7] == 0)
    # every real query spreads probability 1 over its group's keys: 2 query heads per KV head
    torch.testing.assert_close(scores.sum(-1), valid.sum(-1, keepdim=True).float().expand(2, 2) * 2)


def test_decode_row_probs_sum_each_group_and_skip_empty_slots():
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
    valid = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    probs = decode_row_probs(query, key, valid, 0.3)
    torch.testing.assert_close(probs.sum(-1), torch.full((2, 2), 2.0))
    assert torch.all(probs[1, :, [1, 4]] == 0)
    expected = torch.softmax((query[0, 2, 0] @ key[0, 1].T) * 0.3, -1) + torch.softmax(
        (query[0, 3, 0] @ key[0, 1].T) * 0.3, -1
    )
    torch.testing.assert_close(probs[0, 1], expected)


# ---- (a) a budget that is never reached changes nothing ---------------------------------------------------
@pytest.mark.parametrize(("kind", "kv_heads"), [("llama", 4), ("llama", 2), ("mistral", 2)])
def test_unreached_budget_is_identical_to_dynamic_cache(kind, kv_heads):
    model = tiny_llm(kind, kv_heads)
    ids, mask = left_padded([10, 6, 8])
    plain = generate(model, ids, mask, DynamicCache(config=model.config), 9)
    enable_kv_eviction(model)
    cache = KVEvictionCache(h2o(heavy_ratio=2.0, recent_ratio=1.0), mask)  # budget 3P > P + 8 for every sample
    pruned = generate(model, ids, mask, cache, 9)
    assert torch.equal(pruned.sequences, plain.sequences)
    for ours, theirs in zip(pruned.logits, plain.logits):
        assert torch.equal(ours, theirs)
    assert cache.kv_lengths() == [10 + 8, 6 + 8, 8 + 8]


def test_enabled_model_is_unchanged_with_a_plain_cache():
    model = tiny_llm("llama", 2)
    enabled = enable_kv_eviction(copy.deepcopy(model))
    ids, mask = left_padded([7, 9])
    plain = generate(model, ids, mask, None, 6)
    again = generate(enabled, ids, mask, None, 6)
    assert torch.equal(plain.sequences, again.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, again.logits))


def test_enable_is_idempotent_and_touches_only_attention():
    model = tiny_llm("llama", 2)
    enable_kv_eviction(model)
    hooks = [len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers]
    enable_kv_eviction(model)
    assert [len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers] == hooks == [1, 1]
    assert model.config._attn_implementation == "kv_eviction_sdpa"


# ---- (c) token accounting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [7, 10, 13])
@pytest.mark.parametrize("new_tokens", [1, 2, 6])
def test_half_half_keeps_exactly_the_prompt_length(prompt, new_tokens):
    model = enable_kv_eviction(tiny_llm("llama", 2))
    ids, mask = left_padded([prompt])
    cache = KVEvictionCache(h2o(), mask)
    generate(model, ids, mask, cache, new_tokens)
    assert cache.kv_lengths() == [prompt] == cache.prompt_lengths()
    for layer in cache.layers:
        assert layer.keys.shape[-2] <= prompt + 1
        assert layer.valid.sum(-1).tolist() == [prompt]
    assert cache.get_seq_length() == prompt + new_tokens - 1


def test_kv_length_is_capped_per_sample_and_excludes_pads():
    model = enable_kv_eviction(tiny_llm("llama", 2))
    lengths, new_tokens = [12, 5, 9], 7
    ids, mask = left_padded(lengths)
    cache = KVEvictionCache(h2o(heavy_ratio=0.5, recent_ratio=0.75), mask)  # budget floor(1.25 P): 15, 6, 11
    generate(model, ids, mask, cache, new_tokens)
    assert cache.budgets() == [15, 6, 11]
    expected = [min(p + new_tokens - 1, b) for p, b in zip(lengths, cache.budgets())]
    assert cache.kv_lengths() == expected == [15, 6, 11]
    for layer_idx in range(2):
        for sample, heads in enumerate(cache.kept_positions(layer_idx)):
            for positions in heads:
                assert len(positions) == expected[sample]
                assert 0 <= positions[0] and positions[-1] == lengths[sample] + new_tokens - 2
    # a sample that stopped after 2 tokens reports what its own run would hold
    assert cache.kv_lengths(generated=[2, 7, 1]) == [13, 6, 9]


def test_absolute_budget_caps_the_cache():
    model = enable_kv_eviction(tiny_llm("mistral", 2))
    ids, mask = left_padded([11, 4])
    cache = KVEvictionCache(h2o(heavy_budget=3, recent_budget=2), mask)
    generate(model, ids, mask, cache, 6)
    assert cache.kv_lengths() == [5, 5]
    assert max(layer.keys.shape[-2] for layer in cache.layers) <= 11  # prefill packs to 5; pads are never kept


# ---- (d) sampling and beam search ------------------------------------------------------------------------
def test_sampling_runs_with_eviction():
    model = enable_kv_eviction(tiny_llm("llama", 2))
    ids, mask = left_padded([9, 6])
    torch.manual_seed(3)
    cache = KVEvictionCache(h2o(heavy_ratio=0.25, recent_ratio=0.25), mask)
    out = generate(model, ids, mask, cache, 8, do_sample=True, top_k=20, temperature=0.9)
    assert out.sequences.shape == (2, 9 + 8)
    assert cache.kv_lengths() == cache.budgets() == [4, 3]


def test_several_samples_per_prompt_need_the_repeated_mask():
    model = enable_kv_eviction(tiny_llm("llama", 2))
    ids, mask = left_padded([9, 6])
    cache = KVEvictionCache(h2o(heavy_ratio=0.25, recent_ratio=0.25), mask.repeat_interleave(3, dim=0))
    out = generate(model, ids, mask, cache, 5, do_sample=True, num_return_sequences=3)
    assert out.sequences.shape == (6, 9 + 5)
    assert cache.kv_lengths() == [4, 4, 4, 3, 3, 3]


def test_beam_search_is_refused():
    model = enable_kv_eviction(tiny_llm("llama", 2))
    ids, mask = left_padded([8])
    with pytest.raises(ValueError, match="beam search is not supported"):
        generate(model, ids, mask, KVEvictionCache(h2o(), mask), 4, num_beams=2)
    # even with a cache sized for the expanded batch, reordering the beams is refused
    with pytest.raises(ValueError, match="beam search is not supported"):
        generate(model, ids, mask, KVEvictionCache(h2o(), mask.repeat(2, 1)), 4, num_beams=2)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="kv_pruning='h2o'"):
        KVEvictionCache(PruningConfig(), None)
    with pytest.raises(ValueError, match="left-padded"):
        KVEvictionCache(h2o(), torch.tensor([[1, 1, 0]]))
    model = enable_kv_eviction(tiny_llm("llama", 2))
    ids, mask = left_padded([6])
    with pytest.raises(ValueError, match="attention_mask has 5 columns but the prompt has 6"):
        generate(model, ids, mask, KVEvictionCache(h2o(), mask[:, 1:]), 2)
    with pytest.raises(ValueError, match="not supported"):
        enable_kv_eviction(tiny_llm("llama", 2, attn="eager"))
    sliding = MistralForCausalLM(MistralConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(ValueError, match="sliding-window"):
        enable_kv_eviction(sliding)


def test_cache_without_enable_fails_loudly():
    model = tiny_llm("llama", 2)
    ids, mask = left_padded([6])
    with pytest.raises(RuntimeError, match="enable_kv_eviction"):
        generate(model, ids, mask, KVEvictionCache(h2o(heavy_ratio=0.25, recent_ratio=0.25), mask), 3)


# ---- flash-attention plumbing, with a stand-in backend --------------------------------------------------
def fake_flash_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Flash-attention's contract on CPU: picks itself from the config; takes a 2-D [batch, keys] mask or None."""
    assert module.config._attn_implementation == "flash_attention_fake"
    length, keys = query.shape[2], key.shape[2]
    allowed = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)[None, None]
    if attention_mask is not None:
        assert attention_mask.ndim == 2
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return sdpa_attention_forward(module, query, key, value, allowed, scaling=scaling, is_causal=False)


def test_flash_backend_gets_its_own_name_and_a_2d_slot_mask():
    AttentionInterface.register("flash_attention_fake", fake_flash_attention)
    AttentionMaskInterface.register("flash_attention_fake", ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    sdpa = enable_kv_eviction(tiny_llm("llama", 2))
    flash = tiny_llm("llama", 2)
    flash.config._attn_implementation = "flash_attention_fake"
    enable_kv_eviction(flash)
    assert flash.config._attn_implementation == "kv_eviction_flash_attention_fake"
    ids, mask = left_padded([10, 7])
    config = h2o(heavy_ratio=0.25, recent_ratio=0.25)
    expected = generate(sdpa, ids, mask, KVEvictionCache(config, mask), 6)
    cache = KVEvictionCache(config, mask)
    got = generate(flash, ids, mask, cache, 6)
    assert torch.equal(got.sequences, expected.sequences)
    assert cache.kv_lengths() == [5, 3]
