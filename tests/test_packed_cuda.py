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
from transformers import LogitsProcessor, LogitsProcessorList

from llava.inference import generate_answers
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import TinySpec, write_tiny_llava, write_tiny_llava_next
from pruning.packing import PACK_MULTIPLE, PackedLayout, cuda_varlen_kernel, packed_sdpa
from tests.helpers import random_image
from tests.test_packed_prefill import CASES, SIZES, FakeAttention, PrefillSpy, prompts_for

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


@pytest.mark.parametrize("family", ["llava-1.5", "llava-1.6"])
@pytest.mark.parametrize("case", ["stage1", "stages1+2", "fastv+stage1"])
def test_packed_batch_on_cuda_matches_the_padded_batch(checkpoints, family, case, monkeypatch) -> None:
    """fp16 on the GPU: the prefill runs packed through the varlen kernel; token counts equal the padded batch's,
    the first token's logits agree within fp16 rounding, and so do the greedy answers."""
    tokenizer, model, processor, _ = load_pretrained_model(str(checkpoints[family]), None, None, device="cuda")
    assert model.dtype == torch.float16
    images = [random_image(i, size) for i, size in enumerate(SIZES)]
    prompts, config = prompts_for(model), CASES[case]

    def run(packed: bool):
        first = FirstScores()
        answers = generate_answers(
            model, tokenizer, processor, prompts, images, pruning=config, max_new_tokens=6, packed_prefill=packed,
            generate_kwargs={"logits_processor": LogitsProcessorList([first])},
        )  # fmt: skip
        return answers, first.scores

    calls = KernelCalls(monkeypatch)
    with PrefillSpy(model) as spy:
        packed, packed_scores = run(True)
    real = sum(a.token_stats["prompt"] for a in packed)
    assert spy.shapes[0] == (1, -(-real // PACK_MULTIPLE) * PACK_MULTIPLE), "the prefill did not run packed"
    assert calls.count == model.config.num_hidden_layers, "each layer's prefill must go through varlen_attn"
    padded, padded_scores = run(False)
    assert [a.token_stats for a in packed] == [a.token_stats for a in padded]
    torch.testing.assert_close(packed_scores, padded_scores, rtol=0, atol=2e-2 * padded_scores.abs().max().item())
    assert [a.text for a in packed] == [a.text for a in padded]
