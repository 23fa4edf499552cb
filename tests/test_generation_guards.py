"""LLaVA generate refuses what it cannot do and says what it changes: beam search with KV eviction (whether asked
for in the call or in a generation config), and prompts cut to tokenizer_model_max_length (a warning with counts)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GenerationConfig

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt, generate_answers
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.generation import PromptTruncatedWarning
from pruning import PruningConfig

KV = PruningConfig(kv_pruning="h2o", heavy_ratio=0.25, recent_ratio=0.25, visual_layer=2)


def _inputs(tokenizer, model, processor, image):
    prompt = build_prompt("What is in the image?", "vicuna_v1", model_config=model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)])
    return ids, process_images([image], processor, model.config)


def test_beam_search_from_the_generation_config_is_refused_with_kv_eviction(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    ids, pixels = _inputs(tokenizer, model, processor, images[0])
    call = dict(images=pixels, pruning=KV, max_new_tokens=3, pad_token_id=0, do_sample=False)
    with pytest.raises(ValueError, match="beam search is not supported with KV eviction.*generation_config.num_beams"):
        model.generate(ids, generation_config=GenerationConfig(num_beams=2, max_new_tokens=3), **call)
    saved = model.generation_config.num_beams
    model.generation_config.num_beams = 2  # as a checkpoint's generation_config.json can set it
    try:
        with pytest.raises(ValueError, match="beam search is not supported with KV eviction"):
            model.generate(ids, **call)
        assert model.generate(ids, num_beams=1, **call).shape[0] == 1  # the call's own setting wins, as in HF
    finally:
        model.generation_config.num_beams = saved


def test_return_sequences_from_the_generation_config_size_the_eviction_cache(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    ids, pixels = _inputs(tokenizer, model, processor, images[0])
    config = GenerationConfig(num_return_sequences=2, do_sample=True, max_new_tokens=3, pad_token_id=0)
    out = model.generate(ids, images=pixels, pruning=KV, generation_config=config, return_stats=True)
    assert out.sequences.shape[0] == 2 and len(out.token_stats) == 2


def test_a_truncated_prompt_is_reported_with_its_counts(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompt = build_prompt("What is in the image?", "vicuna_v1", model_config=model.config)
    text = len(tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)  # a prompt that fits: silence
        full = generate_answers(model, tokenizer, processor, [prompt], images[:1], max_new_tokens=2)[0]
    visual = full.token_stats["visual_after"]
    assert full.token_stats["prompt"] == text + visual
    saved = getattr(model.config, "tokenizer_model_max_length", None)
    model.config.tokenizer_model_max_length = text + visual - 5
    try:
        with pytest.warns(PromptTruncatedWarning) as caught:
            cut = generate_answers(model, tokenizer, processor, [prompt], images[:1], max_new_tokens=2)[0]
    finally:
        model.config.tokenizer_model_max_length = saved
    assert cut.token_stats["prompt"] == text + visual - 5
    message = str(caught[0].message)
    assert f"the prompt has {text + visual} tokens ({text} text + {visual} visual)" in message
    assert f"tokenizer_model_max_length is {text + visual - 5}: its last 5 tokens" in message
