"""Phi-3-vision with both stages. Stage 1 per crop on merged tokens: the kept tokens of every crop equal an
independent computation of the rule (eq. 1 CLS scores from the reference tower, summed over each 2x2 block, the
inflection point by its definition, k = ceil(i*/alpha)); the pruned sequence (sub_GN closing each row that keeps a
token, glb_GN, the global view) equals a reference built from the official layout; the pooled crop budget; stage 2
on Phi-3's fused-qkv attention against the masked H2O reference; a batch of 4 = four single runs, both stages on."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import generate_answers
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.llava_arch import MultimodalInputError
from pruning import PruningConfig, register_llm_method, register_vision_method, registry
from tests.helpers import random_image
from tests.test_kv_cache import h2o, left_padded
from tests.test_kv_reference import run_cache, run_reference
from tests.test_method_registry import TOY_DROP_KEEP, TOY_LAYER, FirstVisualTokens
from tests.test_phi3v import (
    OFFICIAL_PROMPT,
    PROMPT,
    build_reference,
    crops_per_image,
    load,
    official_input_ids,
    tiny_checkpoint,
)
from tests.test_phi3v_preprocessing import official_preprocess

LAYER = 2  # the tiny tower has 4 layers; the real one is scored at 16 of 24
SIZES = [(120, 90), (64, 160), (400, 50), (30, 20)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def phi3v(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def reference(ckpt):
    return build_reference(ckpt)


# ---- the independent rule ------------------------------------------------------------------------------------
def independent_merged_scores(embed, crops: torch.Tensor, layer: int) -> torch.Tensor:
    """Paper eq. 1 on hidden_states[layer] of the reference tower (full width, softmax over the patches), then the
    sum over each 2x2 block of patches: [crops, 144]."""
    with torch.no_grad():
        hidden = embed.img_processor(crops, output_hidden_states=True).hidden_states[layer]
        block = embed.img_processor.encoder.layers[layer]
        x = block.layer_norm1(hidden)
        query = block.self_attn.q_proj(x[:, :1])  # [N, 1, D]
        keys = block.self_attn.k_proj(x[:, 1:])  # [N, 576, D]
        scores = torch.softmax((query @ keys.transpose(1, 2))[:, 0] / math.sqrt(x.shape[-1]), dim=-1)
    return scores.view(-1, 12, 2, 12, 2).sum(dim=(2, 4)).flatten(1)


def independent_inflection(curve: list[float]) -> int:
    d = sorted(curve, reverse=True)
    n = len(d)
    if d[0] == d[-1]:
        return n
    f = [(n - i) * (d[0] - d[i - 1]) / (d[0] - d[-1]) for i in range(1, n)]
    return 1 + f.index(max(f))


def independent_keep(merged: torch.Tensor, rule: str, alpha: float = 0.24, topk: int = 0) -> list[set[int]]:
    kept = []
    for row in merged.tolist():
        n = len(row)
        k = min(n, max(1, math.ceil(independent_inflection(row) / alpha - 1e-9))) if rule == "longtail" else topk
        order = sorted(range(n), key=lambda j: (-row[j], j))
        kept.append(set(order[:k]))
    return kept


def our_kept(model, processor, image, pruning):
    embed = model.get_model().vision_embed_tokens
    crops = process_images([image], processor, model.config)[0]
    selection = embed.select_crops(crops, [crops.shape[0]], pruning)
    return [set(index.tolist()) for index in selection.indices], crops


@pytest.mark.parametrize("size", SIZES)
def test_longtail_keeps_what_the_rule_says_per_crop(phi3v, reference, size):
    tokenizer, model, processor = phi3v
    image = random_image(sum(size), size)
    kept, crops = our_kept(model, processor, image, PruningConfig(visual_pruning="longtail", visual_layer=LAYER))
    expected = independent_keep(independent_merged_scores(reference[0], crops, LAYER), "longtail")
    assert kept == expected
    assert sum(len(k) for k in kept) < 144 * len(kept)  # something is cut


def test_topk_per_crop_and_pooled_budget(phi3v, reference):
    tokenizer, model, processor = phi3v
    image = random_image(5, (200, 120))
    topk = PruningConfig(visual_pruning="topk", visual_topk=7, visual_layer=LAYER)
    kept, crops = our_kept(model, processor, image, topk)
    merged = independent_merged_scores(reference[0], crops, LAYER)
    assert kept == independent_keep(merged, "topk", topk=7)
    pooled, _ = our_kept(model, processor, image, topk.merged(crop_budget="global"))
    budget = 7 * crops.shape[0]
    flat = sorted(range(merged.numel()), key=lambda j: (-merged.flatten()[j].item(), j))[:budget]
    assert pooled == [{j % 144 for j in flat if j // 144 == crop} for crop in range(crops.shape[0])]
    assert sum(len(k) for k in pooled) == budget and pooled != kept


def reference_pruned_embeds(reference, tokenizer, image, num_crops, kept: list[set[int]]):
    """The official layout with the unkept merged tokens taken out and a row's sub_GN kept only when the row keeps a
    token; glb_GN always; projected, between the official text embeddings."""
    embed, lm = reference
    pixel_values, image_sizes, num_img_tokens = official_preprocess([image], num_crops)
    h_crop, w_crop = image_sizes[0][0] // 336, image_sizes[0][1] // 336
    with torch.no_grad():
        features = embed.get_img_features(pixel_values[0, : 1 + h_crop * w_crop])
        glb = embed.reshape_hd_patches_2x2merge(features[:1], 1, 1)[0]
        sub = embed.reshape_hd_patches_2x2merge(features[1:], h_crop, w_crop)[0]
    sub_keep = torch.zeros(sub.shape[:2], dtype=torch.bool)
    for crop in range(h_crop * w_crop):
        for j in kept[1 + crop]:
            sub_keep[(crop // w_crop) * 12 + j // 12, (crop % w_crop) * 12 + j % 12] = True
    glb_keep = torch.zeros(12, 12, dtype=torch.bool)
    for j in kept[0]:
        glb_keep[j // 12, j % 12] = True
    newline, separator = embed.sub_GN.reshape(-1), embed.glb_GN.reshape(-1)
    sequence = []
    for grid, keep in ((sub, sub_keep), (glb, glb_keep)):
        for r in range(grid.shape[0]):
            row = [grid[r, c] for c in range(grid.shape[1]) if keep[r, c]]
            if row:
                sequence += row + [newline]
        if grid is sub:
            sequence.append(separator)
    ids = official_input_ids(tokenizer, OFFICIAL_PROMPT, num_img_tokens)[0]
    image_at = (ids < 0).nonzero().flatten()
    with torch.no_grad():
        text = lm.model.embed_tokens(ids.clamp_min(0))
        visual = embed.img_projection(torch.stack(sequence))
    return torch.cat([text[: image_at[0]], visual, text[image_at[-1] + 1 :]])[None], len(sequence)


@pytest.mark.parametrize("size", [(120, 90), (40, 320)])
@pytest.mark.parametrize("rule", ["longtail", "topk"])
def test_pruned_logits_equal_the_reference_layout(phi3v, reference, size, rule):
    tokenizer, model, processor = phi3v
    image = random_image(size[0], size)
    pruning = PruningConfig(visual_pruning=rule, visual_layer=LAYER, **({"visual_topk": 3} if rule == "topk" else {}))
    kept, _ = our_kept(model, processor, image, pruning)
    embeds, length = reference_pruned_embeds(reference, tokenizer, image, processor.num_crops, kept)
    with torch.no_grad():
        expected = reference[1](inputs_embeds=embeds).logits
    model.set_pruning(pruning)
    try:
        ids = torch.tensor([tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX)])
        pixels = process_images([image], processor, model.config)
        with torch.no_grad():
            out = model(input_ids=ids, images=pixels, image_sizes=[image.size])
    finally:
        model.set_pruning(PruningConfig(visual_layer=LAYER))
    assert out.logits.shape == expected.shape
    assert (out.logits - expected).abs().max().item() < 1e-4
    stats = out.token_stats[0]
    assert stats["visual_after"] == length < stats["visual_before"]
    assert stats["crop_kept"] == [len(k) for k in kept]


def test_inside_mode_runs_the_later_layers_on_the_kept_blocks(phi3v, reference):
    """'inside': the tower layers after visual_layer see CLS + the four patches of each kept merged token only."""
    tokenizer, model, processor = phi3v
    embed = model.get_model().vision_embed_tokens
    image = random_image(9, (150, 100))
    inside = PruningConfig(visual_pruning="longtail", visual_layer=1, visual_mode="inside")
    crops = process_images([image], processor, model.config)[0]
    with torch.no_grad():
        selection = embed.select_crops(crops, [crops.shape[0]], inside)
        selected = embed.select_crops(crops, [crops.shape[0]], inside.merged(visual_mode="select"))
        tower = reference[0].img_processor
        hidden = tower(crops, output_hidden_states=True).hidden_states[1]
        for crop, (tokens, index) in enumerate(zip(selection.tokens, selection.indices)):
            assert torch.equal(index, selected.indices[crop])  # the same decision, made at visual_layer
            patches = [
                24 * (2 * (j // 12) + dr) + 2 * (j % 12) + dc for j in index.tolist() for dr in (0, 1) for dc in (0, 1)
            ]
            x = torch.cat([hidden[crop : crop + 1, :1], hidden[crop : crop + 1, 1:][:, patches]], dim=1)
            for layer in tower.encoder.layers[1:3]:  # up to hidden_states[-2] of the 4-layer tower
                x = layer(x, None)
            assert torch.allclose(tokens, x[0, 1:].reshape(len(index), -1), atol=1e-5)
            if len(index) < 144:  # fewer keys change the features
                assert not torch.allclose(tokens, selected.tokens[crop], atol=1e-3)
        assert any(len(index) < 144 for index in selection.indices)


def test_unsupported_methods_are_refused(phi3v):
    tokenizer, model, processor = phi3v
    image = random_image(1, (100, 100))

    @register_vision_method("phi3v_test_method", description="a reducer that is not a keep rule")
    def _method(context):  # pragma: no cover - never reached
        raise AssertionError

    try:
        for bad, match in (
            (PruningConfig(visual_pruning="phi3v_test_method"), "not supported on Phi-3-vision"),
            (PruningConfig(visual_pruning="longtail", visual_layer=9), "visual_layer 9"),
        ):
            with pytest.raises(MultimodalInputError, match=match):
                generate_answers(model, tokenizer, processor, [PROMPT], [image], max_new_tokens=1, pruning=bad)
    finally:
        registry.unregister("visual_pruning", "phi3v_test_method")


# ---- stage 2 ---------------------------------------------------------------------------------------------------
def tiny_phi3(seed: int) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    config = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        initializer_range=0.15,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    return Phi3ForCausalLM(config).eval()


@pytest.mark.parametrize("budgets", [(0.25, 0.25), (0.5, 0.0)])
def test_phi3_fused_qkv_eviction_matches_the_masked_reference(budgets):
    model = tiny_phi3(seed=3)
    lengths, new_tokens = [16, 11], 8
    ids, mask = left_padded(lengths, seed=3)
    ids = ids % 64
    config = h2o(heavy_ratio=budgets[0], recent_ratio=budgets[1])
    per_sample = [
        (math.floor(budgets[0] * p + budgets[1] * p) - math.floor(budgets[1] * p), math.floor(budgets[1] * p))
        for p in lengths
    ]
    expected, state = run_reference(
        model, ids, mask, [h for h, _ in per_sample], [r for _, r in per_sample], new_tokens
    )
    got, cache = run_cache(model, ids, mask, config, new_tokens)
    assert torch.equal(got, expected)
    for layer in range(2):
        assert cache.kept_positions(layer) == state.positions(layer)


def test_llm_side_dropper_runs_on_phi3_layers(phi3v):
    """An LLM-side method (the registry's toy dropper: the first N visual tokens go on from layer 1) acts on Phi-3's
    decoder layers; the separators count as visual, the BOS after the image does not."""
    tokenizer, model, processor = phi3v
    register_llm_method("toy_drop", params=(TOY_LAYER, TOY_DROP_KEEP), description="test")(FirstVisualTokens)
    try:
        images = [random_image(3, (120, 90)), random_image(4, (64, 160))]
        plain = generate_answers(model, tokenizer, processor, [PROMPT] * 2, images, max_new_tokens=4)
        visual = [a.token_stats["visual_after"] for a in plain]
        for keep in (5, max(visual)):
            drop = PruningConfig(visual_layer=LAYER, llm_pruning="toy_drop", toy_drop_layer=1, toy_drop_keep=keep)
            dropped = generate_answers(
                model, tokenizer, processor, [PROMPT] * 2, images, max_new_tokens=4, pruning=drop
            )
            assert [a.token_stats["visual_per_layer"] for a in dropped] == [[v, min(v, keep)] for v in visual]
        assert [a.text for a in dropped] == [a.text for a in plain]  # dropping nothing changes nothing
    finally:
        registry.unregister("llm_pruning", "toy_drop")


def test_batch_of_four_equals_four_single_runs_with_both_stages(phi3v):
    tokenizer, model, processor = phi3v
    images = [random_image(40 + i, size) for i, size in enumerate([(120, 90), (64, 160), (112, 112), (400, 50)])]
    prompts = [PROMPT, PROMPT.replace("What", "Which"), PROMPT, PROMPT.replace("shown", "drawn")]
    both = PruningConfig(
        visual_pruning="longtail", visual_layer=LAYER, kv_pruning="h2o", heavy_ratio=0.25, recent_ratio=0.25
    )
    with crops_per_image(processor, 2):
        batch = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=8, pruning=both)
        singles = [
            generate_answers(model, tokenizer, processor, [p], [i], max_new_tokens=8, pruning=both)[0]
            for p, i in zip(prompts, images)
        ]
    for answer, single in zip(batch, singles):
        assert answer.text == single.text
        assert answer.token_stats == single.token_stats
        stats = answer.token_stats
        assert stats["visual_after"] < stats["visual_before"]
        # the cache ends at its budget, half the (stage-1 pruned) prompt
        assert stats["kv_final"] == min(stats["prompt"] + stats["generated"], math.floor(0.5 * stats["prompt"]))
