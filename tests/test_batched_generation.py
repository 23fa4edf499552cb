"""Batch > 1 with left padding gives the same greedy answers as batch-size-1 runs."""

from __future__ import annotations

from llava.inference import build_prompt, generate_answers

QUESTIONS = [
    "What is in the image?",
    "Is there a red circle in the image? Answer the question using a single word or phrase.",
    "Describe the image in detail, please.",
    "How many objects?",
]


def test_batch_of_four_equals_four_single_runs(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]
    batched = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=10)
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=10)[0] for p, im in zip(prompts, images)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    assert len({a.token_stats["prompt"] for a in batched}) > 1  # the prompts really had different lengths


def test_text_only_and_image_prompts_mix_in_one_batch(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompts = [
        build_prompt("Tell me a joke.", "vicuna_v1", num_images=0, model_config=model.config),
        build_prompt("What is in the image?", "vicuna_v1", model_config=model.config),
    ]
    batched = generate_answers(model, tokenizer, processor, prompts, [None, images[0]], max_new_tokens=6)
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=6)[0]
        for p, im in zip(prompts, [None, images[0]])
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert batched[0].token_stats["visual_after"] == 0
    assert batched[1].token_stats["visual_after"] == model.get_vision_tower().num_patches
