"""Both pruning stages on InternVL2 (tiny random checkpoint in the release layout).

Stage 1 runs per tile at `visual_layer` of InternViT and keeps or drops 2x2-merged tokens whole, a merged token
scoring the sum of its four patches' CLS scores (docs/method.md). `independent_kept` recomputes that rule from the
layer's weights with plain loops (its own CLS row, its own 2x2 sums, the paper's eq. 2-3 as written); the model's kept
tokens per tile must equal it. Stage 2 is H2O on Qwen2's grouped-query attention (with q/k/v bias).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from llava.inference import generate_answers
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.internvl.conversation import hermes_2_prompt
from llava.model.internvl.vision import merge_groups, pixel_shuffle
from llava.testing.tiny_internvl import TinyInternVLSpec, write_tiny_internvl
from pruning import LayerDropper, LayerView, PruningConfig, registry
from pruning.packing import PACK_MULTIPLE

LONGTAIL = PruningConfig(visual_pruning="longtail", visual_layer=2)
BOTH = LONGTAIL.merged(kv_pruning="h2o")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """224-pixel tiles: 16x16 patches, 64 merged tokens per tile, so that the long tail has room to be cut."""
    folder = write_tiny_internvl(
        tmp_path_factory.mktemp("internvl_pruning") / "tiny", TinyInternVLSpec(tile_size=224), 2
    )
    return load(folder)


def load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pretrained_model(str(folder), None, None, device="cpu")


def image(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def independent_kept(model, tiles: torch.Tensor, layer_index: int, alpha: float) -> list[list[int]]:
    """Per tile, the kept merged tokens (raster order) of the long-tail rule, computed from scratch."""
    tower = model.vision_model
    hidden = tower.embeddings(tiles)
    for layer in tower.encoder.layers[:layer_index]:
        hidden = layer(hidden)
    layer = tower.encoder.layers[layer_index]
    width = hidden.shape[-1]
    normed = torch.nn.functional.layer_norm(
        hidden.double(), (width,), layer.norm1.weight.double(), layer.norm1.bias.double(), layer.norm1.eps
    )
    weight, bias = layer.attn.qkv.weight.double(), layer.attn.qkv.bias.double()
    side = round((hidden.shape[1] - 1) ** 0.5)
    kept = []
    for tile in range(tiles.shape[0]):
        query = weight[:width] @ normed[tile, 0] + bias[:width]
        keys = normed[tile, 1:] @ weight[width : 2 * width].T + bias[width : 2 * width]
        patch = torch.softmax(keys @ query / math.sqrt(width), dim=0).tolist()
        merged = []
        for row in range(side // 2):
            for col in range(side // 2):
                block = [(2 * row + dr) * side + 2 * col + dc for dr in (0, 1) for dc in (0, 1)]
                merged.append(sum(patch[p] for p in block))
        curve = sorted(merged, reverse=True)
        n = len(curve)
        if curve[0] == curve[-1]:
            split = n
        else:
            values = [(n - i) * (curve[0] - curve[i - 1]) / (curve[0] - curve[-1]) for i in range(1, n)]
            split = values.index(max(values)) + 1
        k = min(n, max(1, math.ceil(split / alpha - 1e-9)))
        best = sorted(range(n), key=lambda j: (-merged[j], j))[:k]
        kept.append(sorted(best))
    return kept


def test_pixel_shuffle_concatenates_each_2x2_block_in_group_order():
    grid = torch.randn(3, 8, 8, 5)
    shuffled = pixel_shuffle(grid, 0.5).reshape(3, 16, 20)
    groups = merge_groups(8, 2)
    assert groups[0].tolist() == [0, 1, 8, 9] and groups[5].tolist() == [18, 19, 26, 27]
    gathered = grid.reshape(3, 64, 5)[:, groups].reshape(3, 16, 20)
    assert torch.equal(shuffled, gathered)


def test_stage1_keeps_the_merged_tokens_an_independent_computation_keeps(tiny):
    tokenizer, model, processor, _ = tiny
    pixels = processor([image((300, 90), 1), image((112, 112), 2)])["pixel_values"]
    with torch.no_grad():
        pruned = model.image_features(pixels, LONGTAIL)
        full = model.image_features(pixels, PruningConfig(visual_layer=2))
    for number, tiles in enumerate(pixels):
        with torch.no_grad():
            expected = independent_kept(model, tiles, 2, 0.24)
        assert pruned.extra[number]["crop_kept"] == [len(k) for k in expected]
        assert pruned.n[number] == full.kept[number] == 64 * tiles.shape[0]
        rows = torch.tensor([64 * tile + k for tile, kept in enumerate(expected) for k in kept])
        torch.testing.assert_close(pruned.features[number], full.features[number][rows], rtol=0, atol=0)
    assert pruned.kept[0] < pruned.n[0]  # something was pruned


def test_fixed_budget_rules_count_merged_tokens_per_tile(tiny):
    _, model, processor, _ = tiny
    pixels = processor([image((300, 90), 3)])["pixel_values"]  # 4 tiles of 64 merged tokens

    def run(**settings):
        with torch.no_grad():
            return model.image_features(pixels, PruningConfig(visual_layer=2, **settings))

    assert run(visual_pruning="topk", visual_topk=3).extra[0]["crop_kept"] == [3, 3, 3, 3]
    assert run(visual_pruning="ratio", visual_ratio=0.5).extra[0]["crop_kept"] == [32, 32, 32, 32]
    pooled = run(visual_pruning="topk", visual_topk=3, crop_budget="global").extra[0]["crop_kept"]
    assert sum(pooled) == 12 and pooled != [3, 3, 3, 3]  # one budget for the image, spent where the scores are
    model._generator_seed = None  # a fresh stream: the seed decides the draws, each batch draws anew
    first, second = (run(visual_pruning="random", visual_ratio=0.25, seed=7) for _ in range(2))
    model._generator_seed = None
    again = run(visual_pruning="random", visual_ratio=0.25, seed=7)
    assert first.extra[0]["crop_kept"] == [16, 16, 16, 16]
    assert torch.equal(first.features[0], again.features[0])
    assert not torch.equal(first.features[0], second.features[0])


def test_inside_mode_runs_the_later_layers_on_the_kept_blocks_only(tiny):
    _, model, processor, _ = tiny
    pixels = processor([image((300, 90), 4)])["pixel_values"]
    tiles = pixels[0]
    inside = LONGTAIL.merged(visual_mode="inside")
    shapes = []
    spy = model.vision_model.encoder.layers[2].register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    with torch.no_grad():
        everything = model.image_features(pixels, inside.merged(visual_pruning="ratio", visual_ratio=1.0))
        full = model.image_features(pixels, PruningConfig(visual_layer=2))
        shapes.clear()
        pruned = model.image_features(pixels, inside)
        spy.remove()
        kept = independent_kept(model, tiles, 2, 0.24)
        # reference: per tile, CLS + the kept blocks' patches (raster patch order) through layers 2..end, unmasked
        tower = model.vision_model
        hidden = tower.embeddings(tiles)
        for layer in tower.encoder.layers[:2]:
            hidden = layer(hidden)
        groups = merge_groups(16, 2)
        expected = []
        for tile, blocks in enumerate(kept):
            patches = sorted(int(p) for b in blocks for p in groups[b])
            tokens = torch.cat([hidden[tile, :1], hidden[tile, 1:][patches]])[None]
            for layer in tower.encoder.layers[2:]:
                tokens = layer(tokens)
            where = {p: i for i, p in enumerate(patches)}
            rows = [[where[int(p)] for p in groups[b]] for b in blocks]
            expected.append(model.mlp1(tokens[0, 1:][torch.tensor(rows)].reshape(len(blocks), -1)))
    torch.testing.assert_close(everything.features[0], full.features[0], rtol=1e-5, atol=1e-5)
    assert pruned.extra[0]["crop_kept"] == [len(k) for k in kept]
    torch.testing.assert_close(pruned.features[0], torch.cat(expected), rtol=1e-5, atol=1e-5)
    # tiles of different counts ran packed: one sequence of CLS + 4 patches per kept block per tile, then the filler
    assert len(set(pruned.extra[0]["crop_kept"])) > 1
    real = sum(1 + 4 * len(k) for k in kept)
    assert tuple(shapes[0][:2]) == (1, -(-real // PACK_MULTIPLE) * PACK_MULTIPLE)


def test_img_tags_wrap_the_kept_tokens(tiny):
    tokenizer, model, processor, _ = tiny
    pixels = processor([image((90, 400), 5)])["pixel_values"]
    ids = torch.tensor([tokenizer_image_token(hermes_2_prompt("What is it?"), tokenizer)])
    with torch.no_grad():
        merged = model.merge_multimodal(ids, None, None, pixels, "left", LONGTAIL)
    stats = merged.token_stats[0]
    visual = merged.visual_mask[0].nonzero().flatten()
    first, last = int(visual[0]), int(visual[-1])
    assert last - first + 1 == visual.numel() == stats["visual_after"] == sum(stats["crop_kept"])
    assert stats["prompt"] == ids.shape[1] - 1 + 2 + stats["visual_after"]
    embed = model.get_input_embeddings()
    start, end = model.config.img_start_token_id, model.config.img_end_token_id
    assert torch.equal(merged.inputs_embeds[0, first - 1], embed.weight[start])
    assert torch.equal(merged.inputs_embeds[0, last + 1], embed.weight[end])


def test_batch_of_four_with_both_stages_equals_four_single_runs(tiny):
    tokenizer, model, processor, _ = tiny
    pictures = [image(size, seed=10 + i) for i, size in enumerate([(300, 90), (112, 112), (90, 400), (500, 500)])]
    questions = ["What is it?", "Describe the image in detail.", "Is there a red circle in the image?", "Colour?"]
    prompts = [hermes_2_prompt(q) for q in questions]
    batched = generate_answers(model, tokenizer, processor, prompts, pictures, max_new_tokens=6, pruning=BOTH)
    single = [
        generate_answers(model, tokenizer, processor, [p], [i], max_new_tokens=6, pruning=BOTH)[0]
        for p, i in zip(prompts, pictures)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    for answer in batched:
        stats = answer.token_stats
        assert stats["visual_after"] < stats["visual_before"]
        assert stats["kv_final"] == stats["prompt"]  # budget = (0.5 + 0.5) * P


def test_stage2_caps_the_cache_of_qwen2_attention(tiny):
    tokenizer, model, processor, _ = tiny
    prompt = hermes_2_prompt("Describe the image in detail.")
    budget = LONGTAIL.merged(kv_pruning="h2o", heavy_budget=20, recent_budget=10)
    answer = generate_answers(
        model, tokenizer, processor, [prompt], [image((300, 90), 6)], max_new_tokens=5, pruning=budget
    )[0]
    assert answer.token_stats["kv_final"] == 30 < answer.token_stats["prompt"]
    attention = model.language_model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.num_key_value_groups == 2
    assert model.language_model.config._attn_implementation == "kv_eviction_sdpa"


class DropHalfTheImage(LayerDropper):
    """Before decoder layer 1, keep every other visual token (a FastV-shaped test method)."""

    def keep(self, view: LayerView) -> torch.Tensor | None:
        if view.index != 1:
            return None
        order = torch.cumsum(view.visual.long(), dim=1)
        return view.valid & (~view.visual | (order % 2 == 0))


def test_llm_side_methods_see_the_image_positions(tiny, tmp_path):
    # a fresh load: drop_tokens wants the plain 'sdpa' backend, which stage 2 (run by other tests) renames
    tokenizer, model, processor, _ = load(write_tiny_internvl(tmp_path / "fresh", TinyInternVLSpec(tile_size=224), 2))
    registry.register("llm_pruning", "drop_half_test", DropHalfTheImage, description="test only")
    try:
        answer = generate_answers(
            model,
            tokenizer,
            processor,
            [hermes_2_prompt("What is it?")],
            [image((300, 90), 7)],
            max_new_tokens=3,
            pruning=PruningConfig(visual_layer=2, llm_pruning="drop_half_test"),
        )[0]
    finally:
        registry.unregister("llm_pruning", "drop_half_test")
    per_layer = answer.token_stats["visual_per_layer"]
    assert per_layer == [256, 128]


def test_vision_methods_other_than_keep_rules_are_refused(tiny):
    _, model, processor, _ = tiny
    registry.register("visual_pruning", "patchwise_test", lambda context: None, description="test only")
    try:
        with pytest.raises(ValueError, match="--visual-pruning patchwise_test is not available on InternVL2"):
            model.image_features(
                processor([image((112, 112), 8)])["pixel_values"], PruningConfig(visual_pruning="patchwise_test")
            )
    finally:
        registry.unregister("visual_pruning", "patchwise_test")
