"""Stage 1 wired into LLaVA: per-sample kept counts in one batch, sequence lengths, bit-identity when nothing is
pruned, gradients through the selection."""

from __future__ import annotations

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt, generate_answers
from llava.mm_utils import process_images, tokenizer_image_token
from pruning import PruningConfig

LONGTAIL = PruningConfig(visual_pruning="longtail", visual_layer=2)


def _ids(tokenizer, model, question="What is in the image?"):
    prompt = build_prompt(question, "vicuna_v1", model_config=model.config)
    return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)


def test_topk_all_patches_is_bit_identical_to_no_pruning(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    ids = torch.tensor([_ids(tokenizer, model)])
    pixels = process_images(images[:1], processor, model.config)
    n = model.get_vision_tower().num_patches
    with torch.no_grad():
        plain = model(ids, images=pixels).logits
        model.set_pruning(PruningConfig(visual_pruning="topk", visual_topk=n, visual_layer=2))
        topk_all = model(ids, images=pixels).logits
        model.set_pruning(PruningConfig(visual_layer=2))
    assert torch.equal(plain, topk_all)


def test_llm_sequence_is_text_plus_kept_visual_tokens(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    token_lists = [_ids(tokenizer, model, q) for q in ["What is it?", "Describe the picture in detail please."]]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in token_lists], batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(len(t), dtype=torch.long) for t in token_lists], batch_first=True
    )
    pixels = process_images(images[:2], processor, model.config)
    with torch.no_grad():
        merged = model.merge_multimodal(ids, mask, None, pixels, None, "right", LONGTAIL)
    for b, tokens in enumerate(token_lists):
        text_tokens = len(tokens) - 1
        kept = merged.token_stats[b]["visual_after"]
        assert 1 <= kept <= 64
        assert int(merged.attention_mask[b].sum()) == text_tokens + kept == merged.token_stats[b]["prompt"]
    assert merged.inputs_embeds.shape[1] == max(s["prompt"] for s in merged.token_stats)


def test_batched_images_with_different_k_equal_single_runs(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompts = [build_prompt("What is in the image?", "vicuna_v1", model_config=model.config)] * len(images)
    batched = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=8, pruning=LONGTAIL)
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=8, pruning=LONGTAIL)[0]
        for p, im in zip(prompts, images)
    ]
    kept = [a.token_stats["visual_after"] for a in batched]
    assert len(set(kept)) > 1, f"the fixture images should keep different counts, got {kept}"
    assert kept == [a.token_stats["visual_after"] for a in single]
    assert [a.text for a in batched] == [a.text for a in single]
    for answer in batched:
        n, i_star, k = (answer.token_stats[key] for key in ("visual_before", "inflection", "visual_after"))
        assert k == min(n, max(1, -(-i_star * 100 // 24)))  # ceil(i*/0.24) in exact integer arithmetic


def test_gradients_reach_projector_through_the_selection(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    tokens = _ids(tokenizer, model)
    ids = torch.tensor([tokens])
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = -100
    pixels = process_images(images[:1], processor, model.config)
    model.set_pruning(PruningConfig(visual_pruning="topk", visual_topk=10, visual_layer=2))
    try:
        model.zero_grad()
        out = model(ids, images=pixels, labels=labels)
        out.loss.backward()
        grads = [p.grad for p in model.get_model().mm_projector.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        assert out.token_stats[0]["visual_after"] == 10  # statistics travel in the output
        assert not hasattr(model, "_last_token_stats")
    finally:
        model.zero_grad()
        model.set_pruning(PruningConfig(visual_layer=2))


def test_visualize_command_writes_both_figures(tiny_ckpt, tmp_path):
    from PIL import Image

    from eval.tools import visualize
    from tests.helpers import random_image

    image = tmp_path / "scene.png"
    random_image(5).save(image)
    curve, patches = visualize.main(
        [
            "--model-path",
            str(tiny_ckpt),
            "--image-file",
            str(image),
            "--out",
            str(tmp_path / "fig"),
            "--device",
            "cpu",
            "--visual-pruning",
            "topk",
            "--visual-topk",
            "16",
        ]
    )
    assert curve.stat().st_size > 0
    picture = Image.open(patches)
    assert picture.size == (112, 112)
    pixels = picture.convert("RGB").load()
    # a pruned patch is pulled towards grey; with 16 of 64 kept most 14x14 cells must be greyish
    greyish = sum(
        1
        for r in range(8)
        for c in range(8)
        if max(pixels[c * 14 + 7, r * 14 + 7]) - min(pixels[c * 14 + 7, r * 14 + 7]) < 60
    )
    assert greyish >= 40
