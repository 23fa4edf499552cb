"""The packed prefill on a CUDA GPU: PyTorch's FlashAttention-2 variable-length kernel (``varlen_attn``) behind
``packed_sdpa`` in fp16 / bf16, against per-sample attention and against the padded batch.

These tests need a CUDA GPU; CI has none, so they are skipped there (tests/test_packed_prefill.py checks the same
code paths exactly on the CPU). Run them on a GPU machine with ``python -m pytest tests/test_packed_cuda.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import LogitsProcessor, LogitsProcessorList

from llava.inference import generate_answers
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import TinySpec, write_tiny_llava, write_tiny_llava_next
from pruning.packing import PACK_MULTIPLE, PackedLayout, cuda_varlen_kernel, packed_sdpa
from tests.helpers import random_image
from tests.test_packed_prefill import CASES, SIZES, FakeAttention, PrefillSpy, as_flash_attn_func, prompts_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class KernelCalls:
    """Counts the calls of torch's ``varlen_attn`` (the kernel ``packed_sdpa`` looks up at each call)."""

    def __init__(self, monkeypatch):
        self.count = 0
        kernel = torch_varlen.varlen_attn

        def counted(*args, **kwargs):
            self.count += 1
            return kernel(*args, **kwargs)

        counted.__signature__ = inspect.signature(kernel)
        monkeypatch.setattr(torch_varlen, "varlen_attn", counted)


class FirstScores(LogitsProcessor):
    """Keeps the logits of the first generated token (what the prefill produced)."""

    def __init__(self):
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.scores is None:
            self.scores = scores.float().clone()
        return scores


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_varlen_kernel_runs_and_equals_each_sample_alone(dtype, monkeypatch) -> None:
    lengths = [37, 120, 5, 64]
    layout = PackedLayout.from_mask(
        torch.tensor([[0] * (120 - n) + [1] * n for n in lengths], device="cuda"), PACK_MULTIPLE
    )
    generator = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, dim = 8, 2, 128

    def draw(h: int) -> torch.Tensor:
        return torch.randn(1, h, layout.width, dim, device="cuda", generator=generator, dtype=DTYPES[dtype])

    query, key, value = draw(heads), draw(kv_heads), draw(kv_heads)
    assert cuda_varlen_kernel(query) is not None, f"torch {torch.__version__} has no usable varlen_attn"
    calls = KernelCalls(monkeypatch)
    module, scale = FakeAttention(groups=heads // kv_heads), dim**-0.5
    out, _ = packed_sdpa(module, query, key, value, None, scaling=scale, **layout.attention_kwargs())
    assert calls.count == 1 and out.shape == (1, layout.width, heads, dim)
    for start, end in layout.segments():  # fp32 SDPA on each sample alone, causal
        q, k, v = (t[0, :, start:end].float() for t in (query, key, value))
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        alone = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        torch.testing.assert_close(out[0, start:end].float(), alone.transpose(0, 1), rtol=2e-2, atol=2e-2)
    # nothing crosses samples: changing the second sample's keys leaves the others' outputs as they were
    start, end = layout.segments()[1]
    key[:, :, start:end] = -key[:, :, start:end]
    changed, _ = packed_sdpa(module, query, key, value, None, scaling=scale, **layout.attention_kwargs())
    for index, (s, e) in enumerate(layout.segments()):
        assert torch.equal(changed[0, s:e], out[0, s:e]) == (index != 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return {
        "llava-1.5": write_tiny_llava(root / "llava-v1.5-tiny", TinySpec(layers=4, kv_heads=2), 3),
        "llava-1.6": write_tiny_llava_next(root / "llava-v1.6-vicuna-tiny", TinySpec(layers=4), seed=1),
    }


def run_batch(bundle, case: str, packed: bool, max_new_tokens: int = 6):
    """Answers of the four mixed-size images and the first token's logits (what the prefill produced)."""
    tokenizer, model, processor = bundle
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    first = FirstScores()
    answers = generate_answers(
        model, tokenizer, processor, prompts_for(model), images, pruning=CASES[case], max_new_tokens=max_new_tokens,
        packed_prefill=packed, generate_kwargs={"logits_processor": LogitsProcessorList([first])},
    )  # fmt: skip
    return answers, first.scores


def assert_close_in_half_precision(packed, padded) -> None:
    """Token counts equal; first-token logits within fp16 rounding; the first token equal wherever the padded run's
    top-two margin is clearly above the difference (near-ties may flip in half precision, so later tokens are not
    compared)."""
    (packed_answers, packed_scores), (padded_answers, padded_scores) = packed, padded
    assert [a.token_stats for a in packed_answers] == [a.token_stats for a in padded_answers]
    difference = (packed_scores - padded_scores).abs().max().item()
    assert difference <= 2e-2 * padded_scores.abs().max().item()
    top2 = padded_scores.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * difference
    assert bool(clear.any()), "no sample has a clear first token: the comparison would be empty"
    assert torch.equal(packed_scores.argmax(-1)[clear], padded_scores.argmax(-1)[clear])


def load_on(checkpoint, dtype: torch.dtype):
    tokenizer, model, processor, _ = load_pretrained_model(str(checkpoint), None, None, device="cuda", dtype=dtype)
    return tokenizer, model, processor


@pytest.mark.parametrize("family", ["llava-1.5", "llava-1.6"])
@pytest.mark.parametrize("case", ["stage1", "stages1+2", "fastv+stage1"])
def test_packed_batch_on_cuda_matches_the_padded_batch(checkpoints, family, case, monkeypatch) -> None:
    """fp16 on the GPU: each layer's prefill runs packed through the varlen kernel and agrees with the padded batch."""
    bundle = load_on(checkpoints[family], torch.float16)
    calls = KernelCalls(monkeypatch)
    with PrefillSpy(bundle[1]) as spy:
        packed = run_batch(bundle, case, packed=True)
    real = sum(a.token_stats["prompt"] for a in packed[0])
    assert spy.shapes[0] == (1, -(-real // PACK_MULTIPLE) * PACK_MULTIPLE), "the prefill did not run packed"
    assert calls.count == bundle[1].config.num_hidden_layers, "each layer's prefill must go through varlen_attn"
    assert_close_in_half_precision(packed, run_batch(bundle, case, packed=False))


@pytest.mark.parametrize("family", ["llava-1.5", "llava-1.6"])
@pytest.mark.parametrize("case", ["stage1", "stages1+2"])
def test_packed_batch_on_cuda_in_fp32_answers_as_single_runs(checkpoints, family, case) -> None:
    """fp32 on the GPU (per-sample SDPA, the kernel takes half precision only): answers and counts equal batch 1."""
    bundle = load_on(checkpoints[family], torch.float32)
    tokenizer, model, processor = bundle
    packed, _ = run_batch(bundle, case, packed=True)
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    singles = [
        generate_answers(model, tokenizer, processor, [p], [i], pruning=CASES[case], max_new_tokens=6)[0]
        for p, i in zip(prompts_for(model), images)
    ]
    assert [a.text for a in packed] == [a.text for a in singles]
    assert [a.token_stats for a in packed] == [a.token_stats for a in singles]


FLASH_CALLS: list[int] = []


def torch_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    """flash-attention's ``flash_attn_varlen_func`` (Dao-AILab/flash-attention, flash_attn_interface.py, commit
    0053002) on PyTorch's copy of the FlashAttention-2 varlen kernel: the flash-attn package itself has no wheel to
    install on the GPU machine."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    FLASH_CALLS.append(int(cu_seqlens_q.numel()) - 1)
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    return torch_varlen.varlen_attn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale=softmax_scale,
        window_size=(-1, 0) if causal else (-1, -1),
    )  # fmt: skip


torch_flash_attn_func = as_flash_attn_func(torch_flash_attn_varlen_func)


@pytest.mark.parametrize("case", ["stage1", "stages1+2"])
def test_transformers_flash_attention_path_on_cuda(checkpoints, case, monkeypatch) -> None:
    """transformers' flash_attention_2 integration on the GPU, its kernels PyTorch's FlashAttention-2 varlen kernel:
    the packed prefill is one varlen call per layer over the batch's samples (and the filler), and agrees with the
    padded batch under the same path."""
    bundle = load_on(checkpoints["llava-1.5"], torch.float16)
    model = bundle[1]
    kernels = (torch_flash_attn_func, torch_flash_attn_varlen_func, None, flash_utils._pad_input,
               flash_utils._unpad_input)  # fmt: skip
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    FLASH_CALLS.clear()
    packed = run_batch(bundle, case, packed=True)
    layers = model.config.num_hidden_layers
    real = sum(a.token_stats["prompt"] for a in packed[0])
    samples = len(SIZES) + (1 if real % PACK_MULTIPLE else 0)  # the filler is one more sequence
    assert FLASH_CALLS[:layers] == [samples] * layers, "the prefill must be one varlen call per layer"
    assert_close_in_half_precision(packed, run_batch(bundle, case, packed=False))
