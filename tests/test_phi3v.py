"""Phi-3-vision: a tiny random checkpoint in the release layout, loaded by load_pretrained_model, gives the logits
of a reference made of a transcription of the official image embedding (image_embedding_phi3_v.py, processing
and ids as processing_phi3_v.py makes them) plus transformers' own Phi3ForCausalLM; batched generation equals
batch 1; bad folders are named."""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import generate_answers
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.phi3v.loader import load_phi3v_tokenizer
from llava.model.phi3v.modeling import bos_after_images
from llava.testing.tiny_phi3v import write_tiny_phi3v
from tests.helpers import random_image
from tests.test_phi3v_preprocessing import official_preprocess

MAX_INPUT_ID = int(1e9)
PROMPT = "<|user|>\n<image>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
OFFICIAL_PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
# (width, height, num_crops): landscape, portrait, square with one crop, very wide, very tall, tiny upscaled
CASES = [(120, 90, 4), (64, 160, 4), (112, 112, 1), (400, 50, 16), (40, 320, 8), (30, 20, 16)]


def tiny_checkpoint(tmp_path_factory):
    return write_tiny_phi3v(tmp_path_factory.mktemp("phi3v") / "Phi-3-vision-tiny", seed=3)


def load(ckpt):
    """(tokenizer, model, processor) through load_pretrained_model, as every entry point loads."""
    tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), device="cpu")
    return tokenizer, model, processor


@pytest.fixture(scope="module")
def phi3v_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def phi3v(phi3v_ckpt):
    return load(phi3v_ckpt)


# ---- the reference -----------------------------------------------------------------------------------------
class OfficialImageEmbedding(nn.Module):
    """image_embedding_phi3_v.py's Phi3ImageEmbedding (forward, hd_feature_transform, reshape_hd_patches_2x2merge,
    add_image_newline), with the tower width as a parameter instead of the asserted 1024."""

    def __init__(self, clip_config, image_dim_out, hidden_size, wte, vocab_size):
        super().__init__()
        self.wte = wte
        self.vocab_size = vocab_size
        self.img_processor = CLIPVisionModel(clip_config)
        self.image_dim_out = image_dim_out
        self.glb_GN = nn.Parameter(torch.zeros([1, 1, image_dim_out * 4]))
        self.sub_GN = nn.Parameter(torch.zeros([1, 1, 1, image_dim_out * 4]))
        self.img_projection = nn.Sequential(
            nn.Linear(image_dim_out * 4, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.layer_idx = -2

    def get_img_features(self, img_embeds):
        img_processor_output = self.img_processor(img_embeds, output_hidden_states=True)
        img_feature = img_processor_output.hidden_states[self.layer_idx]
        return img_feature[:, 1:]

    def forward(self, input_ids, pixel_values, image_sizes):
        input_shape = input_ids.size()
        input_ids = input_ids.view(-1, input_shape[-1]).clone()
        positions = torch.nonzero((input_ids < 0) & (input_ids > -MAX_INPUT_ID), as_tuple=True)
        input_ids.clamp_min_(0).clamp_max_(self.vocab_size)
        hidden_states = self.wte(input_ids)
        num_images, num_crops, c, h, w = pixel_values.shape
        img_features = self.get_img_features(pixel_values.flatten(0, 1)).reshape(
            num_images, num_crops, -1, self.image_dim_out
        )
        image_features_proj = self.hd_feature_transform(img_features, image_sizes)
        return hidden_states.index_put(positions, image_features_proj, accumulate=False)

    def hd_feature_transform(self, image_features, image_sizes):
        global_image_features = image_features[:, 0]
        global_image_features_hd = self.reshape_hd_patches_2x2merge(global_image_features, 1, 1)
        global_image_features_hd_newline = self.add_image_newline(global_image_features_hd)
        all_image_embeddings = []
        for i, img_size in enumerate(image_sizes):
            h, w = img_size
            h_crop = h // 336
            w_crop = w // 336
            num_crops = h_crop * w_crop
            sub_image_features = image_features[i, 1 : 1 + num_crops]
            sub_image_features_hd = self.reshape_hd_patches_2x2merge(sub_image_features, h_crop, w_crop)
            sub_image_features_hd_newline = self.add_image_newline(sub_image_features_hd)
            all_image_embeddings.extend(
                [sub_image_features_hd_newline.squeeze(0), self.glb_GN.squeeze(0), global_image_features_hd_newline[i]]
            )
        return self.img_projection(torch.cat(all_image_embeddings, dim=0))

    def reshape_hd_patches_2x2merge(self, image_features, h_crop, w_crop):
        N, L, C = image_features.shape
        assert L == 24 * 24 and N % (h_crop * w_crop) == 0
        num_images = N // (h_crop * w_crop)
        H = int(L**0.5)
        return (
            image_features.reshape(N, H, H, C)
            .reshape(N, H // 2, 2, H // 2, 2, C)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(N, -1, 4 * C)
            .reshape(num_images, h_crop, w_crop, H // 2, H // 2, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(num_images, h_crop * H // 2, w_crop * H // 2, 4 * C)
        )

    def add_image_newline(self, image_features_hd):
        num_images, h, w, hid_dim = image_features_hd.shape
        newline_embeddings = self.sub_GN.expand(num_images, h, -1, -1)
        return torch.cat([image_features_hd, newline_embeddings], dim=2).reshape(num_images, -1, hid_dim)


def official_input_ids(tokenizer, text, num_img_tokens):
    """processing_phi3_v.py's _convert_images_texts_to_inputs: every chunk with its own BOS, image n as -n ids."""
    pattern = r"<\|image_\d+\|>"
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in re.split(pattern, text)]
    image_tags = re.findall(pattern, text)
    image_ids = [int(s.split("|")[1].split("_")[-1]) for s in image_tags]
    image_ids_pad = [[-iid] * num_img_tokens[iid - 1] for iid in image_ids]

    def insert_separator(X, sep_list):
        if len(X) > len(sep_list):
            sep_list.append([])
        return [ele for sublist in zip(X, sep_list) for ele in sublist]

    input_ids = []
    for x in insert_separator(prompt_chunks, image_ids_pad):
        input_ids.extend(x)
    return torch.tensor(input_ids, dtype=torch.long).unsqueeze(0)


def checkpoint_state(folder):
    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    return state


@pytest.fixture(scope="module")
def reference(phi3v_ckpt):
    return build_reference(phi3v_ckpt)


def build_reference(phi3v_ckpt):
    """(official image embedding, transformers Phi3ForCausalLM) with the checkpoint's weights."""
    raw = json.loads((phi3v_ckpt / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "_attn_implementation", "model_type")}
    fields["rope_scaling"] = {**raw["rope_scaling"], "type": "longrope"}  # the one rename 5.23 needs
    lm = Phi3ForCausalLM(Phi3Config(**fields, attn_implementation="sdpa")).eval()
    state = checkpoint_state(phi3v_ckpt)
    prefix = "model.vision_embed_tokens."
    lm.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)}, strict=True)
    clip = CLIPVisionConfig(**raw["img_processor"]["clip_config"])
    embed = OfficialImageEmbedding(
        clip, raw["img_processor"]["image_dim_out"], raw["hidden_size"], lm.model.embed_tokens, raw["vocab_size"]
    ).eval()
    vision = {}
    for key, value in state.items():
        if key.startswith(prefix):
            vision[key[len(prefix) :].replace("img_processor.vision_model.", "img_processor.")] = value
    missing, unexpected = embed.load_state_dict(vision, strict=False)
    assert not unexpected and all(k.startswith("wte.") or k.endswith("position_ids") for k in missing)
    return embed, lm


def reference_logits(reference, tokenizer, text, images, num_crops):
    embed, lm = reference
    pixel_values, image_sizes, num_img_tokens = official_preprocess(images, num_crops)
    input_ids = official_input_ids(tokenizer, text, num_img_tokens)
    with torch.no_grad():
        embeds = embed(input_ids, pixel_values, image_sizes)
        return lm(inputs_embeds=embeds, attention_mask=torch.ones(input_ids.shape)).logits, input_ids


@contextmanager
def crops_per_image(processor, num_crops: int):
    """The processor with another num_crops for a while (the model finds each image's grid by itself)."""
    saved, processor.num_crops = processor.num_crops, num_crops
    try:
        yield processor
    finally:
        processor.num_crops = saved


def our_logits(phi3v, prompt, images, num_crops):
    tokenizer, model, processor = phi3v
    with crops_per_image(processor, num_crops):
        pixels = process_images(images, processor, model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)])
    with torch.no_grad():
        out = model(input_ids=ids, images=pixels, image_sizes=[image.size for image in images])
    return out.logits


# ---- equivalence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height,num_crops", CASES)
def test_logits_equal_official_embedding_plus_transformers_phi3(phi3v, reference, width, height, num_crops):
    image = random_image(width + height, (width, height))
    expected, official_ids = reference_logits(reference, phi3v[0], OFFICIAL_PROMPT, [image], num_crops)
    ours = our_logits(phi3v, PROMPT, [image], num_crops)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4
    assert (official_ids < 0).sum() > 144  # the image really is in the prompt


def test_two_images_in_one_prompt(phi3v, reference):
    images = [random_image(7, (90, 120)), random_image(8, (200, 100))]
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two images.<|end|>\n<|assistant|>\n"
    expected, _ = reference_logits(reference, phi3v[0], text, images, 4)
    ours = our_logits(phi3v, text.replace("<|image_1|>", "<image>").replace("<|image_2|>", "<image>"), images, 4)
    assert (ours - expected).abs().max().item() < 1e-4


def test_ids_with_official_bos_after_images_need_no_insertion(phi3v):
    """Ids tokenized chunk by chunk like the official processor (a BOS after each image) are taken as they are."""
    tokenizer = phi3v[0]
    ours = torch.tensor([tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX)])
    official = official_input_ids(tokenizer, OFFICIAL_PROMPT, [3])
    collapsed = [i for n, i in enumerate(official[0].tolist()) if i >= 0 or official[0, n - 1] >= 0]
    collapsed = torch.tensor([[IMAGE_TOKEN_INDEX if i < 0 else i for i in collapsed]])
    inserted, mask, _ = bos_after_images(ours, None, None, tokenizer.bos_token_id)
    assert inserted.tolist() == collapsed.tolist()
    assert bos_after_images(collapsed, None, None, tokenizer.bos_token_id)[0] is collapsed
    assert mask.all()


def test_visual_token_count_is_the_official_formula(phi3v):
    tokenizer, model, processor = phi3v
    for width, height in [(120, 90), (64, 160), (400, 50)]:
        image = random_image(1, (width, height))
        answer = generate_answers(model, tokenizer, processor, [PROMPT], [image], max_new_tokens=1)[0]
        _, _, tokens = official_preprocess([image], processor.num_crops)
        assert answer.token_stats["visual_before"] == answer.token_stats["visual_after"] == tokens[0]
        text = len(tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX)) - 1 + 1  # one BOS inserted
        assert answer.token_stats["prompt"] == tokens[0] + text


def test_batch_of_four_equals_four_single_runs(phi3v):
    tokenizer, model, processor = phi3v
    images = [random_image(20 + i, size) for i, size in enumerate([(120, 90), (64, 160), (112, 112), (400, 50)])]
    questions = ["What is shown in this image?", "Describe it.", "Is there a cat?", "Count the objects."]
    prompts = [f"<|user|>\n<image>\n{q}<|end|>\n<|assistant|>\n" for q in questions]
    with crops_per_image(processor, 2):  # grids 2x1, 1x2, 1x1, 2x1: four different lengths, shorter prompts
        batch = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=8)
        singles = [
            generate_answers(model, tokenizer, processor, [p], [i], max_new_tokens=8)[0]
            for p, i in zip(prompts, images)
        ]
    assert len({a.token_stats["prompt"] for a in batch}) == 4
    for answer, single in zip(batch, singles):
        assert answer.text == single.text
        assert answer.token_stats == single.token_stats


def remote_su_rotary(config, x, position_ids):
    """modeling_phi3_v.py's Phi3SuScaledRotaryEmbedding.forward, for the release's rope_scaling {"type": "su"}."""
    dim = config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    seq_len = torch.max(position_ids) + 1
    if seq_len > config["original_max_position_embeddings"]:
        ext_factors = torch.tensor(config["rope_scaling"]["long_factor"], dtype=torch.float32)
    else:
        ext_factors = torch.tensor(config["rope_scaling"]["short_factor"], dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (ext_factors * base**inv_freq_shape)
    inv_freq_expanded = inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    position_ids_expanded = position_ids[:, None, :].float()
    freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
    scaling_factor = (
        1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(config["original_max_position_embeddings"]))
    )
    return (emb.cos() * scaling_factor).to(x.dtype), (emb.sin() * scaling_factor).to(x.dtype)


def test_longrope_equals_the_remote_su_rotary(phi3v, phi3v_ckpt):
    raw = json.loads((phi3v_ckpt / "config.json").read_text())
    rotary = phi3v[1].get_model().rotary_emb
    x = torch.zeros(1, 1, 8)
    original = raw["original_max_position_embeddings"]
    for positions in (
        torch.arange(0, 50),
        torch.arange(original - 20, original),
        torch.arange(original - 20, original + 5),
    ):
        position_ids = positions[None]
        cos, sin = rotary(x, position_ids)
        expected_cos, expected_sin = remote_su_rotary(raw, x, position_ids)
        assert torch.allclose(cos, expected_cos, atol=1e-5) and torch.allclose(sin, expected_sin, atol=1e-5)
    # the same position rotates differently once the batch reaches past original_max_position_embeddings
    short = rotary(x, torch.arange(original - 2, original)[None])[0][0, 0]
    long = rotary(x, torch.arange(original - 2, original + 5)[None])[0][0, 0]
    assert not torch.allclose(short, long)


# ---- loading -----------------------------------------------------------------------------------------------
def test_loads_the_release_layout(phi3v, phi3v_ckpt):
    tokenizer, model, processor = phi3v
    names = sorted(p.name for p in phi3v_ckpt.iterdir())
    assert "model.safetensors.index.json" in names and "model-00002-of-00002.safetensors" in names
    assert model.config.rope_parameters["rope_type"] == "longrope"
    assert model.config.sliding_window is None  # 131072 = max_position_embeddings: never slides
    assert processor.num_crops == 4
    # <|end|> stops generation, as the official sample passes eos_token_id=tokenizer.eos_token_id
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|end|>")
    # the legacy tokenizer.json is read as is: a ▁ after every special token, as the release tokenizes
    ids = tokenizer("<|user|>\nHi<|end|>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<s>", "<|user|>", "▁"]


@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_follows_tokenizer_config_as_llama_tokenizer_fast_did(phi3v_ckpt, tmp_path, add_bos):
    """transformers 4.38's LlamaTokenizerFast rebuilt the post-processor from add_bos_token whatever tokenizer.json
    held; so does our loader (transformers 5's generic backend would follow the file)."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(phi3v_ckpt / name, folder / name)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_bos_token"] = add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = load_phi3v_tokenizer(folder)("<|user|>\nHi").input_ids
    assert (ids[0] == 1) is add_bos and ids[int(add_bos)] == load_phi3v_tokenizer(folder).convert_tokens_to_ids(
        "<|user|>"
    )


def _copy(folder, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_missing_files_are_named(phi3v_ckpt, tmp_path):
    for missing in ("tokenizer.json", "preprocessor_config.json", "model-00002-of-00002.safetensors"):
        folder = _copy(phi3v_ckpt, tmp_path, f"no-{missing}")
        (folder / missing).unlink()
        with pytest.raises(CheckpointError, match=re.escape(missing)):
            load_pretrained_model(str(folder), device="cpu")


def test_missing_weight_is_named(phi3v_ckpt, tmp_path):
    folder = _copy(phi3v_ckpt, tmp_path, "no-sub-gn")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.vision_embed_tokens.sub_GN"]
    with safe_open(str(shard), framework="pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.vision_embed_tokens.sub_GN"}
    save_file(kept, str(shard), metadata={"format": "pt"})
    del index["weight_map"]["model.vision_embed_tokens.sub_GN"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="sub_GN"):
        load_pretrained_model(str(folder), device="cpu")


def test_wrong_family_is_named(phi3v_ckpt, tiny_ckpt, tmp_path):
    # a LLaVA-1.5 folder whose config claims Phi-3-vision: its weights are not Phi-3-vision's
    folder = _copy(tiny_ckpt, tmp_path, "llava-as-phi3v")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(phi3v_ckpt / name, folder / name)
    for shard in folder.glob("pytorch_model*.bin*"):
        shard.unlink()
    state = {k: v for k, v in checkpoint_state(phi3v_ckpt).items() if not k.startswith("model.vision_embed_tokens.")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((phi3v_ckpt / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not match Phi-3-vision.*vision_embed_tokens"):
        load_pretrained_model(str(folder), device="cpu")
    # a phi3_v config without the release's image sections
    del config["embd_layer"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: a Phi-3-vision config needs an 'embd_layer'"):
        load_pretrained_model(str(folder), device="cpu")


def test_phi3v_refuses_model_base(phi3v_ckpt):
    with pytest.raises(CheckpointError, match="model-base"):
        load_pretrained_model(str(phi3v_ckpt), model_base="lmsys/vicuna-7b-v1.5", device="cpu")
