"""LLaVA-1.6 (anyres): pruning off, our model computes what transformers' LlavaNextForConditionalGeneration computes
with the same weights; the three merge types against a dense upstream-style reference; stage 1 across crops (per
crop and pooled) keeps spatial order, unpadding and row newlines; batched = batch 1; loading the release layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import CLIPVisionModel, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt, generate_answers
from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model.anyres import AnyresInputError, crop_candidates, crops_per_image, select_crop_tokens, unpad_window
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import write_tiny_llava_next
from pruning import PruningConfig, PruningConfigError
from tests.helpers import batched_answers_equal_singles, random_image
from tests.test_model_equivalence import copy_weights_into, expand_image_tokens

CONV = {"vicuna": "vicuna_v1", "mistral": "mistral_instruct"}
# (width, height): landscape, portrait, square, very wide (3x1 grid), very tall (1x3 grid), tiny
SIZES = [(120, 90), (64, 160), (112, 112), (400, 50), (40, 320), (30, 20)]
LONGTAIL = PruningConfig(visual_pruning="longtail", visual_layer=2)


@pytest.fixture(scope="module")
def next_models(tmp_path_factory):
    """{'vicuna': (tokenizer, model, processor), 'mistral': ...} loaded from tiny 1.6 checkpoints via the builder."""
    root = tmp_path_factory.mktemp("tiny16")
    out = {}
    for llm in ("vicuna", "mistral"):
        ckpt = write_tiny_llava_next(root / f"llava-v1.6-{llm}-tiny", seed=1, llm=llm)
        tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), device="cpu")
        out[llm] = (tokenizer, model, processor, ckpt)
    return out


@pytest.fixture(scope="module")
def sized_images():
    return [random_image(10 + i, size) for i, size in enumerate(SIZES)]


def _ids(tokenizer, model, conv, question="What is in the image?"):
    return tokenizer_image_token(build_prompt(question, conv, model_config=model.config), tokenizer, IMAGE_TOKEN_INDEX)


# ---- reference: transformers' LLaVA-NeXT ---------------------------------------------------------------------
def to_transformers_llava_next(model) -> LlavaNextForConditionalGeneration:
    """Copy our weights into transformers' LLaVA-NeXT; the image token gets a new id = old vocab size."""
    cfg = model.config
    tower = model.get_vision_tower()
    vocab = cfg.vocab_size
    text = {
        "vocab_size": vocab + 1,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": cfg.rope_parameters,
    }
    text_cfg = MistralConfig(**text, sliding_window=None) if cfg.model_type == "llava_mistral" else LlamaConfig(**text)
    hf_cfg = LlavaNextConfig(
        vision_config=tower.config.to_dict(),
        text_config=text_cfg.to_dict(),
        image_token_id=vocab,
        vision_feature_layer=cfg.mm_vision_select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        # transformers reads pinpoints and image sizes as (height, width); upstream as (width, height)
        image_grid_pinpoints=[[h, w] for w, h in cfg.image_grid_pinpoints],
        tie_word_embeddings=False,
    )
    hf = LlavaNextForConditionalGeneration(hf_cfg).eval()
    copy_weights_into(model, hf)
    hf.model.image_newline.data = model.get_model().image_newline.data.clone()
    return hf


@pytest.mark.parametrize("llm", ["vicuna", "mistral"])
def test_logits_equal_transformers_llava_next(next_models, sized_images, llm):
    tokenizer, model, processor, _ = next_models[llm]
    hf = to_transformers_llava_next(model)
    vocab = model.config.vocab_size
    ids = _ids(tokenizer, model, CONV[llm])
    grids = set()
    for image in sized_images if llm == "vicuna" else sized_images[3:5]:
        pixels = process_images([image], processor, model.config)  # [1, 1 + crops, 3, 112, 112]
        grids.add(get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, 112))
        with torch.no_grad():
            ours = model(torch.tensor([ids]), images=pixels, image_sizes=[image.size])
            visual = ours.token_stats[0]["visual_after"]
            hf_ids = expand_image_tokens(ids, visual, vocab)
            theirs = hf(input_ids=hf_ids, pixel_values=pixels, image_sizes=torch.tensor([image.size[::-1]]))
        assert ours.logits.shape[1] == theirs.logits.shape[1] == len(ids) - 1 + visual
        torch.testing.assert_close(ours.logits, theirs.logits[..., :vocab], atol=1e-4, rtol=1e-4)
    assert {(3, 1), (1, 3)} <= grids  # the very wide and very tall images really used 3-crop grids

    image = sized_images[3]
    pixels = process_images([image], processor, model.config)
    out = model.generate(
        torch.tensor([ids]),
        images=pixels,
        image_sizes=[image.size],
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=0,
        return_stats=True,
    )
    hf_ids = expand_image_tokens(ids, out.token_stats[0]["visual_after"], vocab)
    ref = hf.generate(
        input_ids=hf_ids,
        pixel_values=pixels,
        image_sizes=torch.tensor([image.size[::-1]]),
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=0,
    )
    assert out.sequences.tolist() == ref[:, hf_ids.shape[1] :].tolist()


def test_unpad_window_matches_transformers_unpad_image():
    for grid_h, grid_w in [(8, 16), (16, 8), (16, 16), (8, 24), (24, 8), (48, 48)]:
        probe = torch.arange(grid_h * grid_w).view(1, grid_h, grid_w)
        for width in (1, 3, 7, 30, 64, 111, 112, 200, 333, 640, 1000, 4000):
            for height in (1, 5, 13, 50, 90, 112, 301, 480, 999, 3000):
                row0, row1, col0, col1 = unpad_window(grid_h, grid_w, (width, height))
                expected = hf_unpad_image(probe, (height, width))
                assert torch.equal(probe[:, row0:row1, col0:col1], expected), (grid_h, grid_w, width, height)


# ---- reference: upstream's dense reshape, for all three merge types --------------------------------------------
def dense_reference(model, crops: torch.Tensor, image_size, merge_type: str) -> torch.Tensor:
    """Upstream LLaVA-1.6's prepare_inputs_labels_for_multimodal for one image, on unpruned features."""
    tower = model.get_vision_tower()
    with torch.no_grad():
        feats = model.encode_images(crops, PruningConfig(visual_layer=2)).features  # per crop [n, hidden]
    feats = torch.stack(feats)  # [1 + crops, n, hidden]
    if merge_type == "flat":
        return feats.flatten(0, 1)
    base, grid = feats[0], feats[1:]
    side = tower.num_patches_per_side
    cols, rows = get_anyres_image_grid_shape(image_size, model.config.image_grid_pinpoints, 112)
    grid = grid.view(rows, cols, side, side, -1)
    if merge_type == "spatial":
        return torch.cat([base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)])
    grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [hidden, H, W]
    grid = hf_unpad_image(grid, image_size[::-1])
    newline = model.get_model().image_newline[:, None, None].expand(*grid.shape[:-1], 1)
    grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat([base, grid])


@pytest.mark.parametrize("merge_type", ["flat", "spatial", "spatial_unpad"])
def test_merge_types_equal_upstream_dense_layout(next_models, sized_images, merge_type):
    _, model, processor, _ = next_models["vicuna"]
    saved = model.config.mm_patch_merge_type
    model.config.mm_patch_merge_type = merge_type
    try:
        for image in sized_images:
            crops = process_images([image], processor, model.config)[0]
            with torch.no_grad():
                ours = model.image_features([crops], [image.size], PruningConfig(visual_layer=2))
            expected = dense_reference(model, crops, image.size, merge_type)
            assert ours.kept[0] == ours.n[0] == expected.shape[0]
            torch.testing.assert_close(ours.features[0], expected, atol=1e-5, rtol=1e-5)
    finally:
        model.config.mm_patch_merge_type = saved


# ---- stage 1 across crops ----------------------------------------------------------------------------------------
def _match_rows(pruned: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Index in ``full`` of each row of ``pruned`` (nearest row; asserted to be a real match)."""
    distances = torch.cdist(pruned, full, compute_mode="donot_use_mm_for_euclid_dist")
    best = distances.argmin(dim=1)
    assert torch.all(distances[torch.arange(len(best)), best] < 1e-4)
    return best.tolist()


@pytest.mark.parametrize(
    "pruning",
    [
        LONGTAIL,
        PruningConfig(visual_pruning="topk", visual_topk=9, visual_layer=2),
        PruningConfig(visual_pruning="longtail", visual_layer=2, crop_budget="global"),
    ],
    ids=["longtail", "topk", "global"],
)
def test_pruned_layout_is_the_full_layout_minus_dropped_tokens(next_models, sized_images, pruning):
    """Kept tokens keep their order on the unpadded grid; a newline ends exactly the rows that keep a token."""
    _, model, processor, _ = next_models["vicuna"]
    n = model.get_vision_tower().num_patches
    newline = model.get_model().image_newline.detach()
    for image in sized_images:
        crops = process_images([image], processor, model.config)[0]
        with torch.no_grad():
            full = model.image_features([crops], [image.size], PruningConfig(visual_layer=2)).features[0]
            pruned_out = model.image_features([crops], [image.size], pruning)
        pruned = pruned_out.features[0]
        extra = pruned_out.extra[0]
        assert pruned_out.kept[0] == pruned.shape[0] < full.shape[0] == pruned_out.n[0]
        is_newline_full = torch.all(full == newline, dim=1)
        is_newline = torch.all(pruned == newline, dim=1)
        assert int(is_newline.sum()) == extra["newlines"]
        base_kept = extra["crop_kept"][0]
        assert not is_newline[:base_kept].any()  # the base crop: no newlines
        where = _match_rows(pruned[~is_newline], full[~is_newline_full])
        full_pos = torch.nonzero(~is_newline_full).flatten()[where].tolist()  # positions in the full sequence
        assert full_pos == sorted(full_pos) and len(set(full_pos)) == len(full_pos)
        assert all(p < n for p in full_pos[:base_kept]) and all(p >= n for p in full_pos[base_kept:])
        # grid part: a newline between two kept tokens exactly when the full layout had one between them
        grid_flags = is_newline[base_kept:].tolist()
        grid_pos = iter(full_pos[base_kept:])
        sequence = [None if flag else next(grid_pos) for flag in grid_flags]
        rows_full = torch.cumsum(is_newline_full.long(), 0).tolist()  # row number of each full position
        for a, b in zip(sequence, sequence[1:]):
            if a is not None and b is not None:
                assert rows_full[a] == rows_full[b]
        tokens = [p for p in sequence if p is not None]
        after = [sequence[i + 1] if i + 1 < len(sequence) else "end" for i, p in enumerate(sequence) if p is not None]
        for position, following in zip(tokens, after):
            if following is None:
                continue  # a newline: the row ended
            assert following != "end", "the last kept row must end with a newline"
            assert rows_full[following] == rows_full[position]
        assert sum(extra["crop_kept"]) == len(tokens) + base_kept  # padding never competes: every kept token arrives
        assert extra["crops"] == crops.shape[0] == len(extra["crop_kept"]) == len(extra["crop_inflection"])


def test_per_crop_budget_follows_each_crops_own_curve_over_the_unpadded_patches(next_models, sized_images):
    _, model, processor, _ = next_models["vicuna"]
    image = sized_images[4]  # 40x320 on a 1x3 grid: 8 patch columns per crop, the image covers the middle 4
    crops = process_images([image], processor, model.config)[0]
    with torch.no_grad():
        out = model.image_features([crops], [image.size], LONGTAIL)
        topk = model.image_features(
            [crops], [image.size], PruningConfig(visual_pruning="topk", visual_topk=40, visual_layer=2)
        )
    extra = out.extra[0]
    candidates = [64, 32, 32, 32]
    expected = [min(c, max(1, math.ceil(i / 0.24 - 1e-9))) for c, i in zip(candidates, extra["crop_inflection"])]
    assert extra["crop_kept"] == expected
    assert out.inflection[0] == extra["crop_inflection"][0]  # the sample's i* is the base image's
    assert topk.extra[0]["crop_kept"] == [40, 32, 32, 32]  # a grid crop cannot keep more than its unpadded part
    assert topk.kept[0] == 40 + 3 * 32 + 24  # every kept token reaches the LLM; 24 rows, each with a newline


def test_global_budget_pools_the_per_crop_budgets_over_the_best_tokens(next_models, sized_images):
    _, model, processor, _ = next_models["vicuna"]
    tower, projector = model.get_vision_tower(), model.get_model().mm_projector
    images = [process_images([im], processor, model.config)[0] for im in sized_images[:4]]
    counts = [c.shape[0] for c in images]
    crops = torch.cat(images)
    topk = PruningConfig(visual_pruning="topk", visual_topk=10, visual_layer=2)
    with torch.no_grad():
        per_crop = select_crop_tokens(tower, projector, crops, counts, topk)
        pooled = select_crop_tokens(tower, projector, crops, counts, topk.merged(crop_budget="global"))
        scores = tower.select(crops, PruningConfig(visual_pruning="ratio", visual_ratio=1.0, visual_layer=2)).scores
    start, moved = 0, False
    for count, a, b in zip(counts, per_crop, pooled):
        kept_a = [len(i) for i in a.indices]
        kept_b = [len(i) for i in b.indices]
        assert kept_a == [10] * count and sum(kept_b) == 10 * count
        moved |= kept_a != kept_b
        chosen = torch.zeros(count, scores.shape[1], dtype=torch.bool)
        for c, idx in enumerate(b.indices):
            assert idx.tolist() == sorted(idx.tolist())  # raster order inside each crop
            chosen[c, idx] = True
        image_scores = scores[start : start + count]
        assert image_scores[chosen].min() >= image_scores[~chosen].max()  # the best tokens of the whole image
        start += count
    assert moved, "pooling should move budget between crops on these images"


def test_global_budget_needs_select_mode(next_models, sized_images):
    _, model, processor, _ = next_models["vicuna"]
    crops = process_images([sized_images[0]], processor, model.config)[0]
    inside = PruningConfig(visual_pruning="longtail", visual_layer=2, crop_budget="global", visual_mode="inside")
    with pytest.raises(AnyresInputError, match="visual_mode 'select'"):
        model.image_features([crops], [sized_images[0].size], inside)
    with pytest.raises(PruningConfigError, match="crop_budget"):
        PruningConfig(crop_budget="everywhere")


@pytest.mark.parametrize(("llm", "crop_budget"), [("vicuna", "per_crop"), ("mistral", "global")])
def test_batched_equals_single_with_pruning(next_models, sized_images, llm, crop_budget):
    tokenizer, model, processor, _ = next_models[llm]
    images = [sized_images[i] for i in (0, 1, 3, 4)]  # 2x1, 1x2, 3x1, 1x3 grids
    questions = ["What is in the image?", "Describe it.", "Is there a cat?", "Count the objects."]
    prompts = [build_prompt(q, CONV[llm], model_config=model.config) for q in questions]
    pruning = PruningConfig(
        visual_pruning="longtail",
        visual_layer=2,
        crop_budget=crop_budget,
        kv_pruning="h2o",
        heavy_ratio=0.25,
        recent_ratio=0.25,
    )
    batched = batched_answers_equal_singles(model, tokenizer, processor, prompts, images, pruning, 5)
    for answer, prompt in zip(batched, prompts):
        stats = answer.token_stats
        text = len(tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)) - 1
        assert stats["prompt"] == text + stats["visual_after"]
        assert stats["visual_after"] < stats["visual_before"]
        assert len(stats["crop_kept"]) == stats["crops"][0] and len(stats["crop_inflection"]) == stats["crops"][0]
        assert stats["kv_final"] == stats["prompt"] // 2  # stage 2 caps the cache at (0.25 + 0.25) x P
    assert len({a.token_stats["crops"][0] for a in batched}) > 1  # the batch mixed grids of different sizes


def test_no_pruning_batched_equals_single_and_counts_full_sequence(next_models, sized_images):
    tokenizer, model, processor, _ = next_models["vicuna"]
    images = [sized_images[i] for i in (3, 2, 5)]
    prompts = [build_prompt("What is in the image?", "vicuna_v1", model_config=model.config)] * len(images)
    batched = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=4)
    single = [
        generate_answers(model, tokenizer, processor, [p], [im], max_new_tokens=4)[0] for p, im in zip(prompts, images)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    # 400x50 on a 3x1 grid of 8x8-patch crops: 24 columns; the image fills 3 of 8 rows, unpad keeps the middle 4
    wide = batched[0].token_stats
    rows = 8 - (8 - 50 * 24 // 400) // 2 * 2
    assert rows == 4
    assert wide["visual_before"] == wide["visual_after"] == 64 + rows * 24 + rows
    assert wide["crop_kept"] == [64] * 4 and wide["newlines"] == [rows]


# ---- input errors ---------------------------------------------------------------------------------------------
def test_anyres_input_errors_name_the_problem(next_models, sized_images):
    _, model, processor, _ = next_models["vicuna"]
    crops = process_images([sized_images[3]], processor, model.config)[0]  # 4 crops (3x1 grid)
    with pytest.raises(AnyresInputError, match="image_sizes"):
        model.image_features([crops], None)
    with pytest.raises(AnyresInputError, match="image 0: size \\(64, 160\\) maps to a 1x2 crop grid"):
        model.image_features([crops], [sized_images[1].size])
    with pytest.raises(AnyresInputError, match="2 image_sizes for 1 images"):
        model.image_features([crops], [sized_images[3].size] * 2)
    with pytest.raises(AnyresInputError, match="\\[crops, 3, H, W\\]"):
        crops_per_image([crops[None, None]])
    saved = model.config.mm_patch_merge_type
    model.config.mm_patch_merge_type = "spatial_unpad_anyres_max_9"
    try:
        with pytest.raises(AnyresInputError, match="mm_patch_merge_type"):
            model.image_features([crops], [sized_images[3].size])
    finally:
        model.config.mm_patch_merge_type = saved


# ---- loading the release layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["vicuna", "mistral"])
def test_release_layout_loads_with_the_tuned_tower(next_models, llm):
    from safetensors import safe_open

    _, model, processor, ckpt = next_models[llm]
    config = json.loads((ckpt / "config.json").read_text())
    assert type(model).__name__ == {"vicuna": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM"}[llm]
    assert config["model_type"] == model.config.model_type
    assert model.config.unfreeze_mm_vision_tower is True and model.config.image_aspect_ratio == "anyres"
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    with safe_open(str(ckpt / weight_map[key]), framework="pt") as handle:
        saved = handle.get_tensor(key)
    loaded = model.get_vision_tower().vision_tower.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(loaded, saved)  # the checkpoint's tuned tower ...
    folder = CLIPVisionModel.from_pretrained(model.config.mm_vision_tower)
    assert not torch.equal(loaded, folder.encoder.layers[0].self_attn.q_proj.weight)  # ... not the CLIP folder's
    with safe_open(str(ckpt / weight_map["model.image_newline"]), framework="pt") as handle:
        assert torch.equal(model.get_model().image_newline, handle.get_tensor("model.image_newline"))


# ---- the random rule over crops -----------------------------------------------------------------------------------
def random_crop_patterns(model, crops, candidates, pruning) -> list[list[int]]:
    tower, projector = model.get_vision_tower(), model.get_model().mm_projector
    with torch.no_grad():
        (tokens,) = select_crop_tokens(tower, projector, crops, [crops.shape[0]], pruning, candidates)
    return [idx.tolist() for idx in tokens.indices]


@pytest.mark.parametrize("crop_budget", ["per_crop", "global"])
@pytest.mark.parametrize("unpadded", [True, False])
def test_random_rule_draws_a_pattern_per_crop_and_per_batch_reproducibly(
    next_models, sized_images, crop_budget, unpadded
):
    _, _, processor, ckpt = next_models["vicuna"]
    image = sized_images[4]  # 40x320 on a 1x3 grid: the three grid crops have the same 32 unpadded patches
    fresh = [load_pretrained_model(str(ckpt), device="cpu")[1] for _ in range(2)]
    crops = process_images([image], processor, fresh[0].config)[0]
    side = fresh[0].get_vision_tower().num_patches_per_side
    candidates = [None, *crop_candidates((1, 3), side, image.size)] if unpadded else None
    if unpadded:
        assert all(mask is not None and int(mask.sum()) == 32 for mask in candidates[1:])
    pruning = PruningConfig(visual_pruning="random", visual_ratio=0.25, visual_layer=2, seed=7, crop_budget=crop_budget)
    first, second = (random_crop_patterns(fresh[0], crops, candidates, pruning) for _ in range(2))
    assert len({tuple(pattern) for pattern in first[1:]}) == 3  # each crop its own draw, not one pattern for all
    assert first != second  # a new pattern for the next batch
    assert random_crop_patterns(fresh[1], crops, candidates, pruning) == first  # the same sequence from the seed
