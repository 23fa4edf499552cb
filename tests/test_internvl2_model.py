"""InternVL2-1B from its released folder layout: loading, logits against transformers' own InternVL classes, batching,
and the errors a wrong folder gets.

The reference is `transformers.InternVLForConditionalGeneration` (5.23) holding the same weights, converted here the
way its conversion script maps the original names (qkv split by rows into q/k/v; `model.` prefixes of 5.x; the
image token set to this tokenizer's `<IMG_CONTEXT>`; `tie_word_embeddings=False`, since the release has its own
head), fed the official expanded prompt (`<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`) and the tiles of
`load_image`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from llava.inference import generate_answers
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.internvl.conversation import expand_image_tokens, hermes_2_prompt
from llava.model.internvl.modeling_internvl_chat import InternVLChatModel
from llava.model.internvl.tokenization import SPECIAL_TOKENS
from llava.model.llava_arch import MultimodalInputError
from llava.testing.tiny_internvl import TinyInternVLSpec, write_tiny_internvl

# (width, height) -> tiles of 112 px with the release's 1..12 grid and thumbnail
SIZES_AND_TILES = [((112, 112), 1), ((300, 90), 4), ((90, 400), 6), ((500, 500), 10), ((40, 600), 13)]


def load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pretrained_model(str(folder), None, None, device="cpu")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_internvl(tmp_path_factory.mktemp("internvl") / "InternVL2-1B-tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load(tiny_folder)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_transformers(folder: Path, tokenizer) -> InternVLForConditionalGeneration:
    """transformers' InternVL with the release's weights renamed (fp32)."""
    raw = json.loads((folder / "config.json").read_text())
    v, llm = raw["vision_config"], raw["llm_config"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        attention_bias=v["qkv_bias"],
        use_qk_norm=v["qk_normalization"],
        intermediate_size=v["intermediate_size"],
        hidden_act=v["hidden_act"],
        norm_type=v["norm_type"],
        layer_norm_eps=v["layer_norm_eps"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        use_mean_pooling=True,  # no final norm, as InternViT
    )
    dropped = ("_attn_implementation", "architectures", "_name_or_path", "torch_dtype", "use_bfloat16")
    text = Qwen2Config(**{k: value for k, value in llm.items() if k not in dropped})
    per_tile = (raw["force_image_size"] // v["patch_size"] // 2) ** 2
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=per_tile,
        downsample_ratio=raw["downsample_ratio"],
        projector_hidden_act="gelu",
        vision_feature_layer=raw["select_layer"],
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    width = v["hidden_size"]
    renamed = {}
    layer_names = {
        "attn.proj": "attention.projection_layer",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
    }
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        tensor = tensor.float()
        if key.startswith("language_model.model."):
            renamed["model.language_model." + key.removeprefix("language_model.model.")] = tensor
        elif key == "language_model.lm_head.weight":
            renamed["lm_head.weight"] = tensor
        elif key.startswith("mlp1."):
            _, index, kind = key.split(".")
            name = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}[index]
            renamed[f"model.multi_modal_projector.{name}.{kind}"] = tensor
        elif key == "vision_model.embeddings.class_embedding":
            renamed["model.vision_tower.embeddings.cls_token"] = tensor
        elif key == "vision_model.embeddings.position_embedding":
            renamed["model.vision_tower.embeddings.position_embeddings"] = tensor
        elif key.startswith("vision_model.embeddings.patch_embedding."):
            renamed["model.vision_tower.embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = tensor
        else:
            layer, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            prefix = f"model.vision_tower.encoder.layer.{layer}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(width, dim=0)):
                    renamed[f"{prefix}attention.{name}.{kind}"] = part
            elif rest in ("ls1", "ls2"):
                renamed[prefix + {"ls1": "lambda_1", "ls2": "lambda_2"}[rest]] = tensor
            else:
                module, kind = rest.rsplit(".", 1)
                renamed[f"{prefix}{layer_names[module]}.{kind}"] = tensor
    reference = InternVLForConditionalGeneration(config).float().eval()
    result = reference.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference


def ours_and_reference_logits(tokenizer, model, processor, reference, picture, question):
    pixels = processor([picture])["pixel_values"]
    prompt = hermes_2_prompt(question)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
    expanded = expand_image_tokens(prompt, [pixels[0].shape[0]], model.config.num_image_token)
    reference_ids = tokenizer(expanded, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids, images=pixels).logits
        theirs = reference(input_ids=reference_ids, pixel_values=pixels[0]).logits
    return ours, theirs, pixels, reference_ids


# ---- loading -------------------------------------------------------------------------------------------------------
def test_release_layout_loads(tiny, tiny_folder):
    tokenizer, model, processor, context_len = tiny
    assert isinstance(model, InternVLChatModel)
    assert sorted(p.name for p in tiny_folder.iterdir()) == [
        "added_tokens.json",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert model.dtype == torch.float32
    assert model.language_model.config._attn_implementation == "sdpa"  # the release asks for flash_attention_2
    # a separate head, not tied to the embeddings
    assert not torch.equal(model.language_model.lm_head.weight, model.get_input_embeddings().weight)
    # special tokens after the vocabulary, in the release's order
    base = len(tokenizer) - len(SPECIAL_TOKENS)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, len(tokenizer)))
    assert model.config.img_context_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.language_model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (processor.tile_size, processor.max_num, processor.use_thumbnail) == (112, 12, True)
    assert model.config.num_image_token == 16 and context_len == 32768


# ---- equivalence with transformers' InternVL ---------------------------------------------------------------------------
def test_logits_equal_transformers_internvl(tiny, tiny_folder):
    tokenizer, model, processor, _ = tiny
    reference = to_transformers(tiny_folder, tokenizer)
    last = []
    for size, tiles in SIZES_AND_TILES:
        ours, theirs, pixels, _ = ours_and_reference_logits(
            tokenizer, model, processor, reference, image(size, seed=size[0]), "Describe this picture."
        )
        assert pixels[0].shape[0] == tiles
        assert ours.shape == theirs.shape == (1, theirs.shape[1], len(tokenizer))
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (size, (ours - theirs).abs().max())
        last.append(ours[0, -1])
    assert (last[0] - last[1]).abs().max() > 1e-2  # the images matter


def test_interpolated_position_embeddings_equal_transformers(tmp_path):
    """A tower whose position table is for 56 px (4x4) run on 112 px tiles (8x8): bicubic interpolation."""
    spec = TinyInternVLSpec(tower_image_size=56)
    folder = write_tiny_internvl(tmp_path / "interp", spec=spec, seed=1)
    tokenizer, model, processor, _ = load(folder)
    reference = to_transformers(folder, tokenizer)
    ours, theirs, _, _ = ours_and_reference_logits(tokenizer, model, processor, reference, image((300, 90), 5), "Hi?")
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_trained_size_skips_an_exact_identity():
    """At the trained grid the official code still interpolates (bicubic to the same size); that is the identity."""
    from llava.model.internvl.configuration_internvl_chat import InternVisionConfig
    from llava.model.internvl.modeling_intern_vit import InternVisionEmbeddings

    config = InternVisionConfig(hidden_size=8, image_size=56, patch_size=14, num_attention_heads=2)
    embeddings = InternVisionEmbeddings(config)
    table = embeddings.position_embedding[:, 1:].float().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    official = torch.nn.functional.interpolate(table, size=(4, 4), mode="bicubic", align_corners=False)
    official = official.reshape(1, -1, 16).permute(0, 2, 1)
    assert torch.equal(embeddings.patch_positions(4, 4), official)


def test_official_expanded_prompt_is_read_as_the_image(tiny):
    tokenizer, model, processor, _ = tiny
    pixels = processor([image((300, 90), 3)])["pixel_values"]
    prompt = hermes_2_prompt("What is it?")
    placeholder = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
    expanded = tokenizer(expand_image_tokens(prompt, [4], 16), return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=placeholder, images=pixels).logits, model(input_ids=expanded, images=pixels).logits
        )
    short = tokenizer(expand_image_tokens(prompt, [3], 16), return_tensors="pt").input_ids
    with pytest.raises(MultimodalInputError, match="48 <IMG_CONTEXT> tokens but the image has 64"):
        model(input_ids=short, images=pixels)
    with pytest.raises(MultimodalInputError, match="1 image placeholders .* but 2 images"):
        model(input_ids=placeholder, images=pixels * 2)


# ---- batching ------------------------------------------------------------------------------------------------------
def test_batch_of_four_mixed_images_equals_four_single_runs(tiny):
    tokenizer, model, processor, _ = tiny
    pictures = [image(size, seed=i) for i, (size, _) in enumerate(SIZES_AND_TILES[1:])]
    questions = ["What is it?", "Describe the image in detail.", "Is there a red circle in the image?", "Colour?"]
    prompts = [hermes_2_prompt(q) for q in questions]
    batched = generate_answers(model, tokenizer, processor, prompts, pictures, max_new_tokens=6)
    single = [
        generate_answers(model, tokenizer, processor, [p], [i], max_new_tokens=6)[0] for p, i in zip(prompts, pictures)
    ]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.token_stats for a in batched] == [a.token_stats for a in single]
    assert [a.token_stats["crops"] for a in batched] == [[4], [6], [10], [13]]
    assert [a.token_stats["visual_before"] for a in batched] == [64, 96, 160, 208]


# ---- bad folders ---------------------------------------------------------------------------------------------------
def copy_release(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_other_internvl_variants_are_named(tiny_folder, tmp_path):
    internlm = copy_release(tiny_folder, tmp_path / "internlm")
    edit_config(internlm, llm_config__architectures=["InternLM2ForCausalLM"])
    with pytest.raises(
        CheckpointError, match=r"internlm/config.json: llm_config.architectures \['InternLM2ForCausalLM'\]"
    ):
        load(internlm)
    six_b = copy_release(tiny_folder, tmp_path / "vit6b")
    edit_config(six_b, vision_config__qk_normalization=True)
    with pytest.raises(CheckpointError, match="vit6b/config.json: vision_config.qk_normalization is True"):
        load(six_b)
    converted = copy_release(tiny_folder, tmp_path / "hf")
    edit_config(converted, model_type="internvl")
    with pytest.raises(CheckpointError, match="transformers' converted InternVL layout"):
        load(converted)


def test_missing_files_are_named(tiny_folder, tmp_path):
    no_weights = copy_release(tiny_folder, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no_weights has no weights: expected one of model.safetensors"):
        load(no_weights)
    no_vocab = copy_release(tiny_folder, tmp_path / "no_vocab")
    (no_vocab / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="no_vocab has no tokenizer: missing merges.txt"):
        load(no_vocab)


def test_weights_of_another_model_are_named(tiny_folder, tmp_path):
    folder = copy_release(tiny_folder, tmp_path / "foreign")
    state = load_file(str(folder / "model.safetensors"))
    state = {k.replace("vision_model.", "vision_tower."): v for k, v in state.items() if not k.startswith("mlp1.")}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"foreign: the weights do not match .*missing: \['mlp1.0.bias'"):
        load(folder)
