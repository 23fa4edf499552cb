"""Packed prefill (pruning/packing.py): a batch whose samples keep different token counts runs its LLM prefill on the
real tokens only, and answers as each sample does alone.

Checked here: the layout and the packed attention against a block-diagonal SDPA and against a pure-torch
``flash_attn_varlen_func`` written from flash-attention's documented API (the arguments the varlen path passes);
greedy answers and token statistics of packed batches equal batch-1 runs for stage 1, stages 1+2, vision-side
baselines (pool) and LLM-side ones (fastv, pdrop, fastv + stage 2) on LLaVA-1.5 and LLaVA-1.6 tiny models, InternVL2
too; transformers' own flash-attention path with the reference kernel; the fallbacks and switches;
grouping requests by length; the runner flags; the speed suite's packed rows.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from eval.tools import speed
from llava.eval import model_vqa_loader
from llava.inference import build_prompt, generate_answers, length_groups
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import TinySpec, write_tiny_llava, write_tiny_llava_next
from pruning.packing import PACK_MULTIPLE, PackedLayout, packed_sdpa, unsupported_reason
from tests.helpers import random_image, write_jsonl

QUESTIONS = [
    "What is in the image?",
    "Is there a red circle in the image? Answer the question using a single word or phrase.",
    "Describe the image in detail, please.",
    "How many objects?",
]
SIZES = [(120, 90), (64, 160), (112, 112), (200, 50)]
STAGE1 = {"visual_pruning": "longtail", "visual_layer": 2, "alpha": 0.5}
CASES = {
    "stage1": STAGE1,
    "stages1+2": {**STAGE1, "kv_pruning": "h2o", "heavy_ratio": 0.2, "recent_ratio": 0.2},  # evicts at prefill
    "stages1+2-paper": {**STAGE1, "kv_pruning": "h2o"},  # 0.5 / 0.5: evicts while decoding
    "pool": {"visual_pruning": "pool", "visual_topk": 9, "visual_layer": 2},
    "fastv+stage1": {**STAGE1, "llm_pruning": "fastv", "fastv_k": 2, "fastv_ratio": 0.5},
    "pdrop+stage1": {**STAGE1, "llm_pruning": "pdrop", "pdrop_layers": "1,3", "pdrop_ratios": "0.5,0.25"},
    "fastv+stages1+2": {**STAGE1, "llm_pruning": "fastv", "fastv_k": 2, "kv_pruning": "h2o"},
}


# ---- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    """Four decoder layers with grouped-query attention (two query heads per KV head)."""
    ckpt = write_tiny_llava(tmp_path_factory.mktemp("packed") / "llava-v1.5-tiny", TinySpec(layers=4, kv_heads=2), 3)
    return load(ckpt)


@pytest.fixture(scope="module")
def llava16(tmp_path_factory):
    ckpt = write_tiny_llava_next(
        tmp_path_factory.mktemp("packed16") / "llava-v1.6-vicuna-tiny", TinySpec(layers=4), seed=1
    )
    return load(ckpt)


@pytest.fixture(scope="module")
def images():
    return [random_image(i, size) for i, size in enumerate(SIZES)]


def load(ckpt: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), None, None, device="cpu")
    return tokenizer, model, processor


def prompts_for(model, questions=QUESTIONS) -> list[str]:
    return [build_prompt(q, "vicuna_v1", model_config=model.config) for q in questions]


class PrefillSpy:
    """Records the shape of what enters the first decoder layer at each forward (the prefill is the first)."""

    def __init__(self, model):
        self.shapes: list[tuple[int, ...]] = []
        self.handle = model.get_model().layers[0].register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.shapes.append(tuple(hidden.shape[:2]))

    def __enter__(self) -> PrefillSpy:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def assert_packed_equals_singles(bundle, images, config, max_new_tokens=4) -> None:
    tokenizer, model, processor = bundle
    prompts = prompts_for(model)
    with PrefillSpy(model) as spy:
        packed = generate_answers(
            model, tokenizer, processor, prompts, images, pruning=config, max_new_tokens=max_new_tokens
        )
    prompt_lengths = [a.token_stats["prompt"] for a in packed]
    assert len(set(prompt_lengths)) > 1, "the samples must differ in length for packing to matter"
    width = -(-sum(prompt_lengths) // PACK_MULTIPLE) * PACK_MULTIPLE  # the real tokens and the filler
    assert spy.shapes[0] == (1, width), "the prefill did not run packed"
    padded = generate_answers(
        model,
        tokenizer,
        processor,
        prompts,
        images,
        pruning=config,
        max_new_tokens=max_new_tokens,
        packed_prefill=False,
    )
    singles = [
        generate_answers(model, tokenizer, processor, [p], [i], pruning=config, max_new_tokens=max_new_tokens)[0]
        for p, i in zip(prompts, images)
    ]
    assert [a.text for a in packed] == [a.text for a in singles]
    assert [a.token_stats for a in packed] == [a.token_stats for a in singles]
    assert [a.token_stats for a in packed] == [a.token_stats for a in padded]


# ---- the layout and the attention ---------------------------------------------------------------------------------
def test_layout_packs_real_tokens_in_row_major_order() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    layout = PackedLayout.from_mask(mask)
    assert layout.lengths == (2, 4, 1) and layout.total == 7 and layout.max_seqlen == 4
    assert layout.cu_seqlens.dtype == torch.int32 and layout.cu_seqlens.tolist() == [0, 2, 6, 7]
    assert layout.position_ids().tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert layout.segments() == [(0, 2), (2, 6), (6, 7)]
    padded = torch.arange(12.0).view(3, 4)
    assert layout.pack(padded).tolist() == [2, 3, 4, 5, 6, 7, 11]
    assert torch.equal(layout.unpack(layout.pack(padded)), padded * mask)
    block = layout.block_diagonal_mask()[0, 0]
    assert block[1].tolist() == [True, True, False, False, False, False, False]  # sample 0, second token
    assert block[6].tolist() == [False] * 6 + [True]  # the one-token sample sees itself only
    with pytest.raises(ValueError, match="at least one real token"):
        PackedLayout.from_mask(torch.tensor([[1, 1], [0, 0]]))


def test_the_filler_rounds_the_row_up_and_stays_out_of_every_sample() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    layout = PackedLayout.from_mask(mask, multiple=4)
    assert (layout.total, layout.fill, layout.width, layout.max_seqlen) == (7, 1, 8, 4)
    assert layout.position_ids().tolist() == [[0, 1, 0, 1, 2, 3, 0, 0]]  # the filler: its own positions
    assert layout.attention_kwargs()["cu_seq_lens_q"].tolist() == [0, 2, 6, 7, 8]  # the filler: one more sequence
    assert layout.segments() == [(0, 2), (2, 6), (6, 7)]  # the samples only
    padded = torch.arange(12.0).view(3, 4)
    assert layout.pack(padded).tolist() == [2, 3, 4, 5, 6, 7, 11, 0]
    assert torch.equal(layout.unpack(layout.pack(padded)), padded * mask)
    assert PackedLayout.from_mask(mask, multiple=7).fill == 0 and PackedLayout.from_mask(mask).width == 7
    with pytest.raises(ValueError, match="cannot hold 9"):
        layout.unpack(torch.zeros(9))
    # the samples' attention outputs are those of the layout without a filler
    plain = PackedLayout.from_mask(mask)
    query, key, value = random_qkv([*layout.lengths, layout.fill])
    module, scale = FakeAttention(groups=2), 8**-0.5
    filled, _ = packed_sdpa(module, query, key, value, None, scaling=scale, **layout.attention_kwargs())
    alone, _ = packed_sdpa(
        module, *(t[:, :, :7] for t in (query, key, value)), None, scaling=scale, **plain.attention_kwargs()
    )
    assert filled.shape == (1, 8, 4, 8) and torch.equal(filled[:, :7], alone)


class FakeAttention(torch.nn.Module):
    """What the attention functions read of a module: GQA groups and causality."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def random_qkv(lengths, heads=4, kv_heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    query = torch.randn(1, heads, total, dim, generator=generator)
    key = torch.randn(1, kv_heads, total, dim, generator=generator)
    value = torch.randn(1, kv_heads, total, dim, generator=generator)
    return query, key, value


def block_diagonal_sdpa(query, key, value, layout: PackedLayout, scale: float) -> torch.Tensor:
    """The reference: one SDPA over the packed row with the block-diagonal causal mask; [T, heads, dim]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=layout.block_diagonal_mask(), scale=scale
    )
    return out[0].transpose(0, 1)


def test_packed_sdpa_equals_the_block_diagonal_mask_and_each_sample_alone() -> None:
    layout = PackedLayout.from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]))
    query, key, value = random_qkv(layout.lengths)
    module, scale = FakeAttention(groups=2), 8**-0.5
    out, _ = packed_sdpa(module, query, key, value, None, scaling=scale, **layout.attention_kwargs())
    assert out.shape == (1, layout.total, 4, 8)
    torch.testing.assert_close(out[0], block_diagonal_sdpa(query, key, value, layout, scale), rtol=1e-5, atol=1e-6)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    for start, end in layout.segments():
        alone, _ = sdpa(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, scaling=scale
        )
        assert torch.equal(out[0, start:end], alone[0])  # the very kernel call of a batch-1 run
    with pytest.raises(ValueError, match="one packed row"):
        packed_sdpa(module, query, key, value, torch.ones(1, 1, 1, 1, dtype=torch.bool), **layout.attention_kwargs())


# A pure-torch flash_attn_varlen_func with the documented interface of Dao-AILab/flash-attention
# (flash_attn/flash_attn_interface.py, commit 0053002): q [total_q, nheads, headdim], k / v [total_k, nheads_k,
# headdim], cu_seqlens_q / _k (batch_size + 1,) int32 cumulative lengths, max_seqlen_q / _k the longest sequences,
# softmax_scale default 1 / sqrt(headdim), GQA by head groups, causal mask aligned to the bottom right corner;
# returns [total_q, nheads, headdim].
VARLEN_CALLS: list[dict] = []


def reference_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert q.dim() == 3 and k.dim() == 3 and int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    lengths_q, lengths_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    assert int(max_seqlen_q) == max(lengths_q) and int(max_seqlen_k) == max(lengths_k)
    VARLEN_CALLS.append({"cu_seqlens_q": cu_seqlens_q.clone(), "max_seqlen_q": int(max_seqlen_q), "causal": causal})
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        query = q[q0:q1].transpose(0, 1).float()  # [heads, Lq, dim]
        key = k[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0).float()
        value = v[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0).float()
        logits = query @ key.transpose(-1, -2) * scale
        if causal:  # bottom right: query i sees keys j <= i + Lk - Lq
            rows, cols = q1 - q0, k1 - k0
            allowed = torch.arange(cols)[None, :] <= torch.arange(rows)[:, None] + (cols - rows)
            logits = logits.masked_fill(~allowed, -math.inf)
        out[q0:q1] = (torch.softmax(logits, dim=-1) @ value).transpose(0, 1).to(q.dtype)
    return out


def as_flash_attn_func(varlen_func):
    """flash_attn_func ([batch, seqlen, heads, dim]) as ``varlen_func`` on equal lengths per batch row."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        batch, length_q, length_k = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(0, (batch + 1) * length_q, length_q, dtype=torch.int32, device=q.device)
        cu_k = torch.arange(0, (batch + 1) * length_k, length_k, dtype=torch.int32, device=q.device)
        flat = varlen_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, length_q, length_k, dropout_p=dropout_p,
            softmax_scale=softmax_scale, causal=causal,
        )  # fmt: skip
        return flat.view(q.shape)

    return flash_attn_func


reference_flash_attn_func = as_flash_attn_func(reference_flash_attn_varlen_func)


def test_the_varlen_arguments_give_the_block_diagonal_result() -> None:
    """The arguments the packed flash path passes (cu_seqlens, max_seqlen, q / k / v as [total, heads, dim])."""
    layout = PackedLayout.from_mask(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]))
    query, key, value = random_qkv(layout.lengths, seed=1)
    kwargs = layout.attention_kwargs()
    out = reference_flash_attn_varlen_func(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seqlens_q=kwargs["cu_seq_lens_q"], cu_seqlens_k=kwargs["cu_seq_lens_k"],
        max_seqlen_q=kwargs["max_length_q"], max_seqlen_k=kwargs["max_length_k"], softmax_scale=0.3, causal=True,
    )  # fmt: skip
    torch.testing.assert_close(out, block_diagonal_sdpa(query, key, value, layout, 0.3), rtol=1e-5, atol=1e-6)


# ---- packed batches answer as single runs ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_llava15_packed_batch_equals_single_runs(llava15, images, case) -> None:
    assert_packed_equals_singles(llava15, images, CASES[case])


@pytest.mark.parametrize("case", ["stage1", "stages1+2", "pool", "fastv+stage1"])
def test_llava16_packed_batch_equals_single_runs(llava16, images, case) -> None:
    """LLaVA-1.6: per-crop counts (anyres) make the prompts differ in length even without pruning."""
    assert_packed_equals_singles(llava16, images, CASES[case])


def test_internvl2_packed_batch_equals_single_runs(tmp_path) -> None:
    from llava.model.internvl.conversation import hermes_2_prompt
    from llava.testing.tiny_internvl import TinyInternVLSpec, write_tiny_internvl
    from tests.test_internvl2_pruning import BOTH, image, load

    tokenizer, model, processor, _ = load(write_tiny_internvl(tmp_path / "tiny", TinyInternVLSpec(tile_size=224), 2))
    decoder = model.language_model.model
    assert unsupported_reason(decoder) is None
    pictures = [image(size, seed=10 + i) for i, size in enumerate([(300, 90), (112, 112), (90, 400), (500, 500)])]
    prompts = [hermes_2_prompt(q) for q in QUESTIONS]
    calls = []

    def record(module, args, kwargs) -> None:
        calls.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))

    handle = decoder.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        batched = generate_answers(model, tokenizer, processor, prompts, pictures, max_new_tokens=5, pruning=BOTH)
    finally:
        handle.remove()
    real = sum(a.token_stats["prompt"] for a in batched)
    assert calls[0] == (1, -(-real // PACK_MULTIPLE) * PACK_MULTIPLE)
    singles = [
        generate_answers(model, tokenizer, processor, [p], [i], max_new_tokens=5, pruning=BOTH)[0]
        for p, i in zip(prompts, pictures)
    ]
    assert [a.text for a in batched] == [a.text for a in singles]
    assert [a.token_stats for a in batched] == [a.token_stats for a in singles]


def test_transformers_flash_attention_path_with_the_reference_kernel(llava15, images, monkeypatch) -> None:
    """transformers' flash_attention_2 integration, its varlen kernel replaced by the documented-API reference: the
    packed prefill hands it the layout's cu_seqlens and max_seqlen; answers equal single runs under the same path."""
    tokenizer, model, processor = llava15
    kernels = (reference_flash_attn_func, reference_flash_attn_varlen_func, None, flash_utils._pad_input,
               flash_utils._unpad_input)  # fmt: skip
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert unsupported_reason(model.get_model()) is None
    VARLEN_CALLS.clear()
    for config in (CASES["stages1+2"],):
        prompts = prompts_for(model)
        packed = generate_answers(model, tokenizer, processor, prompts, images, pruning=config, max_new_tokens=5)
        lengths = [a.token_stats["prompt"] for a in packed]
        prefill = VARLEN_CALLS[0]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        width = -(-ends[-1] // PACK_MULTIPLE) * PACK_MULTIPLE  # the filler is one more sequence
        assert prefill["cu_seqlens_q"].tolist() == [0, *ends] + ([width] if width > ends[-1] else [])
        assert prefill["max_seqlen_q"] == max(lengths) and prefill["causal"]
        singles = [
            generate_answers(model, tokenizer, processor, [p], [i], pruning=config, max_new_tokens=5)[0]
            for p, i in zip(prompts, images)
        ]
        assert [a.text for a in packed] == [a.text for a in singles]
        assert [a.token_stats for a in packed] == [a.token_stats for a in singles]
        VARLEN_CALLS.clear()
    model.config._attn_implementation = "sdpa"  # monkeypatch restores it too; the kv_eviction_ rename is undone here
    for module in model.get_model().modules():
        if getattr(getattr(module, "config", None), "_attn_implementation", "sdpa").endswith("flash_attention_2"):
            module.config._attn_implementation = "sdpa"


# ---- switches and fallbacks ----------------------------------------------------------------------------------------
def test_packing_switches_off_by_argument_config_and_hidden_state_requests(llava15, images, monkeypatch) -> None:
    tokenizer, model, processor = llava15
    prompts = prompts_for(model)

    def first_prefill(**kwargs) -> tuple[int, ...]:
        with PrefillSpy(model) as spy:
            generate_answers(model, tokenizer, processor, prompts, images, pruning=STAGE1, max_new_tokens=2, **kwargs)
        return spy.shapes[0]

    assert first_prefill(packed_prefill=False)[0] == 4
    assert first_prefill(generate_kwargs={"output_hidden_states": True, "return_dict_in_generate": True})[0] == 4
    monkeypatch.setattr(model.config, "packed_prefill", False, raising=False)
    assert first_prefill()[0] == 4
    assert first_prefill(packed_prefill=True)[0] == 1


def test_eager_attention_falls_back_and_refuses_an_explicit_request(llava15, images, monkeypatch) -> None:
    tokenizer, model, processor = llava15
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert "eager" in unsupported_reason(model.get_model())
    prompts = prompts_for(model)
    with PrefillSpy(model) as spy:
        generate_answers(model, tokenizer, processor, prompts, images, pruning=STAGE1, max_new_tokens=2)
    assert spy.shapes[0][0] == 4
    with pytest.raises(ValueError, match="packed_prefill=True: attention implementation 'eager'"):
        generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=2, packed_prefill=True)


# ---- grouping requests by length ----------------------------------------------------------------------------------
def test_length_groups_take_the_shortest_first() -> None:
    assert length_groups([5, 3, 9, 3, 7], 2) == [[1, 3], [0, 4], [2]]


def test_grouped_answers_come_back_in_order_and_equal_single_runs(llava15, images) -> None:
    tokenizer, model, processor = llava15
    questions = QUESTIONS + QUESTIONS[::-1]
    pictures = images + images[::-1]
    prompts = prompts_for(model, questions)
    config = CASES["stages1+2"]
    for packed in (True, False):
        grouped = generate_answers(
            model, tokenizer, processor, prompts, pictures, pruning=config, max_new_tokens=5, group_size=3,
            packed_prefill=packed,
        )  # fmt: skip
        singles = [
            generate_answers(model, tokenizer, processor, [p], [i], pruning=config, max_new_tokens=5)[0]
            for p, i in zip(prompts, pictures)
        ]
        assert [a.text for a in grouped] == [a.text for a in singles]
        assert [a.token_stats for a in grouped] == [a.token_stats for a in singles]
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        generate_answers(model, tokenizer, processor, prompts, pictures, group_size=0)


def test_merged_select_cuts_the_padding_of_its_rows(llava15, images) -> None:
    tokenizer, model, processor = llava15
    from llava.inference import left_pad, pad_token_id
    from llava.mm_utils import process_images, tokenizer_image_token

    ids, mask = left_pad([tokenizer_image_token(p, tokenizer) for p in prompts_for(model)], pad_token_id(tokenizer))
    pixels = process_images(images, processor, model.config)
    merged, _ = model.merge_for_generation(ids, mask, pixels, [i.size for i in images], STAGE1)
    lengths = [s["prompt"] for s in merged.token_stats]
    part = merged.select([3, 0])
    assert part.attention_mask.shape == (2, max(lengths[3], lengths[0]))
    assert part.attention_mask.sum(dim=1).tolist() == [lengths[3], lengths[0]]
    assert torch.equal(part.inputs_embeds[1, -lengths[0] :], merged.inputs_embeds[0, -lengths[0] :])
    assert [s["prompt"] for s in part.token_stats] == [lengths[3], lengths[0]]


# ---- the runner flags and the speed suite ---------------------------------------------------------------------------
def test_runner_group_window_and_no_packing_write_the_same_answers(tmp_path) -> None:
    ckpt = write_tiny_llava(tmp_path / "llava-v1.5-tiny", seed=0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        random_image(i, size).save(folder / f"img_{i}.png")
    rows = [{"question_id": i, "image": f"img_{i % 4}.png", "text": QUESTIONS[(3 * i) % 4]} for i in range(7)]
    questions = write_jsonl(tmp_path / "questions.jsonl", rows)

    def answers(name: str, *extra: str) -> list[tuple]:
        out = tmp_path / f"{name}.jsonl"
        args = ["--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(folder),
                "--answers-file", str(out), "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "5",
                "--no-progress", "--visual-pruning", "longtail", "--visual-layer", "2", "--kv-pruning", "h2o",
                "--batch-size", "3", *extra]  # fmt: skip
        assert model_vqa_loader.main(args) == 7
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        return [(row["question_id"], row["text"], json.dumps(row["tokens"], sort_keys=True)) for row in lines]

    default = answers("default")
    assert [qid for qid, _, _ in default] == list(range(7))
    assert answers("padded", "--no-packed-prefill") == default
    assert answers("grouped", "--group-window", "3") == default
    with pytest.raises(SystemExit) as exit_info:
        answers("bad", "--group-window", "0")
    assert exit_info.value.code == 2


def test_speed_suite_reports_packed_rows_ideals_and_the_queue(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "speed"
    report = speed.main(
        ["--model-path", str(tiny_ckpt), "--batch-sizes", "1", "3", "--repeats", "1", "--warmup", "0",
         "--new-tokens", "2", "--target-visual-tokens", "20", "--group-window", "2", "--no-plot", "--out", str(out),
         "--device", "cpu"]
    )  # fmt: skip
    rows = {(row.config, row.batch): row for row in report.rows}
    for batch in (1, 3):
        packed, padded = rows["ours-s1-packed", batch], rows["ours-s1", batch]
        assert packed.token_stats == padded.token_stats  # same tokens, only the prefill's layout differs
        assert packed.ratios.ideal_prefill_speedup == padded.ratios.ideal_prefill_speedup
    assert rows["ours-s1", 3].ratios.ideal_padded_prefill_speedup < rows["ours-s1", 3].ratios.ideal_prefill_speedup
    head = report.headline.ours_s1_packed_prefill["3"]
    assert head.topk_prefill_speedup == rows["topk", 3].ratios.prefill_speedup
    modes = [row.mode for row in report.queue]
    assert modes == list(speed.QUEUE_MODES) and all(row.requests == 6 and row.batch == 3 for row in report.queue)
    by_mode = {row.mode: row for row in report.queue}
    assert (
        by_mode["question order, packed"].llm_prefill_tokens == by_mode["grouped by length, packed"].llm_prefill_tokens
    )
    assert (
        by_mode["grouped by length, padded"].llm_prefill_tokens <= by_mode["question order, padded"].llm_prefill_tokens
    )
    assert by_mode["question order, packed"].llm_prefill_tokens < by_mode["question order, padded"].llm_prefill_tokens
    written = json.loads((out / "speed.json").read_text())
    assert written["headline"]["ours_s1_packed_prefill"]["3"]["topk_prefill_speedup"] is not None
    assert len(written["queue"]) == 4
    text = (out / "speed.md").read_text()
    assert "Packed against padded prefill" in text and "grouped by length, packed" in text


def test_speed_suite_control_row_times_top_k_twice(tiny_ckpt, tmp_path) -> None:
    """--control: top-k's work a second time in every repeat, and its paired ratio to top-k beside packed's."""
    out = tmp_path / "speed"
    report = speed.main(
        ["--model-path", str(tiny_ckpt), "--batch-sizes", "1", "3", "--repeats", "3", "--warmup", "0",
         "--new-tokens", "2", "--target-visual-tokens", "20", "--control", "--no-plot", "--out", str(out),
         "--device", "cpu"]
    )  # fmt: skip
    rows = {(row.config, row.batch): row for row in report.rows}
    for batch in (1, 3):
        control, topk = rows[speed.CONTROL_ROW, batch], rows["topk", batch]
        assert control.token_stats == topk.token_stats and len(control.repeats) == 3
    head = report.headline.ours_s1_packed_prefill["3"]
    ratios = [t.prefill_s / c.prefill_s for t, c in zip(rows["topk", 3].repeats, rows[speed.CONTROL_ROW, 3].repeats)]
    assert head.topk_control_paired == pytest.approx(sorted(ratios)[1])
    assert head.topk_control_paired_range == pytest.approx([min(ratios), max(ratios)])
    low, high = head.vs_topk_paired_range
    assert low <= head.vs_topk_paired <= high
    assert "topk-again" in report.batch_scaling
    written = json.loads((out / "speed.json").read_text())
    assert written["headline"]["ours_s1_packed_prefill"]["3"]["topk_control_paired"] == head.topk_control_paired
    assert "Control: top-k against itself" in (out / "speed.md").read_text()
    plain = speed.main(
        ["--model-path", str(tiny_ckpt), "--batch-sizes", "2", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
         "--no-plot", "--out", str(tmp_path / "plain"), "--device", "cpu"]
    )  # fmt: skip
    assert {row.config for row in plain.rows} == set(speed.ROWS)  # no control row unless asked
    assert plain.headline.ours_s1_packed_prefill["2"].topk_control_paired is None
