"""Stage 2 inside LLaVA's generate: composes with stage 1, per-sample budgets in a padded batch, accounting."""

from __future__ import annotations

import pytest
import torch

from llava.inference import build_prompt, generate_answers
from pruning import PruningConfig

QUESTIONS = ["What is in the image?", "Describe the image in detail, please.", "Any text?", "Count them."]


def _prompts(model):
    return [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]


def test_paper_ratios_cap_the_cache_at_the_prompt_length(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    both = PruningConfig(visual_pruning="longtail", visual_layer=2, kv_pruning="h2o")
    answers = generate_answers(model, tokenizer, processor, _prompts(model), images, max_new_tokens=6, pruning=both)
    for answer in answers:
        stats = answer.token_stats
        assert stats["generated"] >= 1
        assert stats["kv_final"] == stats["prompt"]  # budget = (0.5 + 0.5) x P


def test_small_budget_batched_equals_single(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    pruning = PruningConfig(
        visual_pruning="longtail", visual_layer=2, kv_pruning="h2o", heavy_ratio=0.1, recent_ratio=0.1
    )
    prompts = _prompts(model)
    batched = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=8, pruning=pruning)
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=8, pruning=pruning)[0]
        for p, im in zip(prompts, images)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    for answer in batched:
        assert answer.token_stats["kv_final"] == int(0.2 * answer.token_stats["prompt"])


def test_budget_above_everything_changes_nothing(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompts = _prompts(model)[:2]
    plain = generate_answers(model, tokenizer, processor, prompts, images[:2], max_new_tokens=8)
    roomy = PruningConfig(kv_pruning="h2o", heavy_budget=400, recent_budget=100, visual_layer=2)
    evicting = generate_answers(model, tokenizer, processor, prompts, images[:2], max_new_tokens=8, pruning=roomy)
    assert [a.text for a in evicting] == [a.text for a in plain]
    assert [a.token_stats["kv_final"] for a in evicting] == [a.token_stats["kv_final"] for a in plain]


def test_sampling_runs_and_beam_search_is_refused(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    kv = PruningConfig(kv_pruning="h2o", heavy_ratio=0.2, recent_ratio=0.2, visual_layer=2)
    prompts = _prompts(model)[:2]
    sampled = generate_answers(
        model, tokenizer, processor, prompts, images[:2], temperature=0.8, max_new_tokens=5, pruning=kv, seed=1
    )
    assert all(a.token_stats["generated"] >= 1 for a in sampled)
    with pytest.raises(ValueError, match="beam search"):
        generate_answers(model, tokenizer, processor, prompts, images[:2], num_beams=2, max_new_tokens=3, pruning=kv)


def test_model_config_section_turns_stage_2_on(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    before = model.pruning_config
    try:
        model.set_pruning({"visual_layer": 2, "kv_pruning": "h2o", "heavy_ratio": 0.25, "recent_ratio": 0.25})
        answer = generate_answers(model, tokenizer, processor, _prompts(model)[:1], images[:1], max_new_tokens=4)[0]
        assert answer.token_stats["kv_final"] == answer.token_stats["prompt"] // 2
        assert torch.is_tensor(model.get_model().embed_tokens.weight)
    finally:
        model.set_pruning(before)


def test_several_sequences_per_prompt_with_eviction(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = torch.tensor([tokenizer_image_token(_prompts(model)[0], tokenizer, IMAGE_TOKEN_INDEX)])
    pixels = process_images(images[:1], processor, model.config)
    kv = PruningConfig(kv_pruning="h2o", heavy_ratio=0.2, recent_ratio=0.2, visual_layer=2)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        images=pixels,
        do_sample=True,
        num_return_sequences=3,
        max_new_tokens=4,
        pruning=kv,
        return_stats=True,
        pad_token_id=0,
    )
    assert out.sequences.shape[0] == 3 and len(out.token_stats) == 3
    assert len({s["prompt"] for s in out.token_stats}) == 1
