"""Write a tiny random LLaVA-1.5 or 1.6 checkpoint in the original release format, for tests and the CPU demo.

    python -m llava.testing.tiny_llava --out checkpoints/llava-v1.5-tiny
    python -m llava.testing.tiny_llava --out checkpoints/llava-v1.6-mistral-tiny --version 1.6-mistral

The folder looks like ``liuhaotian/llava-v1.5-7b``: ``config.json`` (model_type "llava", mm_* keys),
``pytorch_model-0000N-of-0000M.bin`` shards with their index (LLM + ``model.mm_projector.*``, rotary ``inv_freq``
buffers included as transformers 4.31 saved them), ``tokenizer.model`` + ``tokenizer_config.json`` (a sentencepiece
model trained on the spot), ``generation_config.json``; the CLIP tower is a separate folder in the
``openai/clip-vit-large-patch14-336`` format (a CLIPModel with text and vision towers, a CLIP tokenizer and the
preprocessor config) named by ``mm_vision_tower``. It is loaded by exactly the code that loads real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from llava.constants import CLIP_MEAN, CLIP_STD
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTowerModel
from llava.model.multimodal_projector.builder import build_vision_projector
from llava.tokenization import load_tokenizer, train_sentencepiece


@dataclass
class TinySpec:
    """Sizes of the tiny model. The defaults keep a test forward pass at a few milliseconds."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 128
    vocab_size: int = 400
    projector: str = "mlp2x_gelu"
    visual_layer: int = 2
    max_position_embeddings: int = 2048


def tokenizer_corpus() -> list[str]:
    """Sentences covering LLaVA's templates and the benchmark prompts, so the tiny vocabulary is not all bytes."""
    lines = [
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "USER: <image>\nWhat is shown in the image? ASSISTANT: A red circle and a blue square.</s>",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Reference OCR token: Stop, Sign, Main, Street",
        "Is there a red circle in the image? Yes. Is there a green triangle in the image? No.",
        "A. yes\nB. no\nC. maybe\nD. none\nE. all",
        "How many objects are there? 0 1 2 3 4 5 6 7 8 9 10",
        "Describe the image in detail. The picture shows a cat sitting on a chair next to a window.",
        "Context: The figure shows a map. Which of these states is farthest north?",
        "请直接回答选项字母。 图中有几个物体？",
        "Please answer yes or no.",
    ]
    return lines * 3


def write_clip_tower(out: Path, spec: TinySpec, seed: int) -> Path:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 4,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    model = CLIPModel(config)
    _randomize(model, std=0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    preprocessor = {
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": spec.image_size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    write_clip_tokenizer(out)
    return out


def write_clip_tokenizer(out: Path) -> None:
    """A CLIP tokenizer whose ids fit the tiny text tower (vocab 99): letters, digits and a few marks, each alone or
    ending a word, no merges; ids 0 and 1 are the text config's BOS and EOS (EOS also pads, as OpenAI's). Text-guided
    vision-side methods (Recoverable Compression) read it with the text tower."""
    marks = string.ascii_lowercase + string.digits + "?.,'"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for mark in marks:
        vocab[mark] = len(vocab)
        vocab[mark + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(out)


def _randomize(model: torch.nn.Module, std: float) -> None:
    """Random weights large enough that outputs differ between images and prompts."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
            else:
                param.normal_(0, std)


def write_tiny_llava(
    out: str | Path,
    spec: TinySpec | None = None,
    seed: int = 0,
    tower_dir: str | Path | None = None,
    shards: int = 2,
    pruning: dict | None = None,
) -> Path:
    """Write the checkpoint folder ``out`` (and the tower at ``tower_dir``, default ``<out>-clip``)."""
    spec = spec or TinySpec()
    out = Path(out)
    tower_dir = Path(tower_dir) if tower_dir is not None else out.with_name(out.name + "-clip")
    write_clip_tower(tower_dir, spec, seed)
    out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(tokenizer_corpus(), out, vocab_size=spec.vocab_size, model_max_length=2048, seed=seed)
    vocab = len(load_tokenizer(out))

    state = _llm_and_projector_state(spec, vocab, seed, family="vicuna", rotary_buffers=True)
    _write_bin_shards(out, state, shards)
    config = {
        "_name_or_path": "./checkpoints/vicuna-tiny",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_length": 4096,
        "max_position_embeddings": spec.max_position_embeddings,
        "mm_hidden_size": spec.vision_hidden,
        "mm_projector_type": spec.projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower_dir.resolve()),
        "model_type": "llava",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab,
    }
    # the tiny tower has few layers: point stage 1 at one that exists (pruning stays off unless asked)
    config["pruning"] = {"visual_layer": spec.visual_layer, **(pruning or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def tiny_grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-1.6's five pinpoints ([w, h] in crops of 336 px: 1x2, 2x1, 2x2, 3x1, 1x3) scaled to the tiny crop."""
    return [[image_size * w, image_size * h] for w, h in [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]]


def write_tiny_llava_next(
    out: str | Path,
    spec: TinySpec | None = None,
    seed: int = 0,
    tower_dir: str | Path | None = None,
    shards: int = 2,
    pruning: dict | None = None,
    llm: str = "vicuna",
    merge_type: str = "spatial_unpad",
) -> Path:
    """A tiny LLaVA-1.6 checkpoint shaped like ``liuhaotian/llava-v1.6-vicuna-7b`` (``llm="vicuna"``, model_type
    llava_llama) or ``-mistral-7b`` (``llm="mistral"``, llava_mistral, grouped-query attention).

    As in the release: anyres config keys, ``image_newline``, safetensors shards, and a fine-tuned vision tower
    (``unfreeze_mm_vision_tower``) whose weights live in the checkpoint under ``model.vision_tower.vision_tower.*``
    and differ from the CLIP folder's, so a loader that kept the folder's weights would be caught.
    """
    if llm == "mistral" and spec is None:
        spec = TinySpec(kv_heads=2)
    spec = spec or TinySpec()
    out = Path(out)
    tower_dir = Path(tower_dir) if tower_dir is not None else out.with_name(out.name + "-clip")
    write_clip_tower(tower_dir, spec, seed)
    out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(tokenizer_corpus(), out, vocab_size=spec.vocab_size, model_max_length=4096, seed=seed)
    vocab = len(load_tokenizer(out))

    state = _llm_and_projector_state(spec, vocab, seed, family=llm, rotary_buffers=False)
    tower = CLIPVisionTowerModel.from_pretrained(tower_dir)  # the quiet loader: the folder holds the text side too
    with torch.no_grad():
        for key, value in tower.state_dict().items():
            tuned = value + 0.02 * torch.randn_like(value) if value.is_floating_point() else value
            # the release's names (transformers 4.x CLIPVisionModel kept a vision_model level)
            state[f"model.vision_tower.vision_tower.vision_model.{key}"] = tuned.contiguous()
    state["model.image_newline"] = torch.randn(spec.hidden) / spec.hidden**0.5
    _write_safetensors_shards(out, state, shards)

    family = {
        "vicuna": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "pretraining_tp": 1,
            "rope_scaling": None,
            "rope_theta": 10000.0,
        },
        "mistral": {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["LlavaMistralForCausalLM"],
            "model_type": "llava_mistral",
            "rope_theta": 1000000.0,
            "sliding_window": None,
        },
    }[llm]
    config = {
        **family,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": tiny_grid_pinpoints(spec.image_size),
        "image_split_resolution": 224,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_position_embeddings,
        "mm_hidden_size": spec.vision_hidden,
        "mm_patch_merge_type": merge_type,
        "mm_projector_lr": 2e-05,
        "mm_projector_type": spec.projector,
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower_dir.resolve()),
        "mm_vision_tower_lr": 2e-06,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab,
    }
    config["pruning"] = {"visual_layer": spec.visual_layer, **(pruning or {})}
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def llm_config_kwargs(spec: TinySpec, vocab: int) -> dict[str, Any]:
    """The Llama / Mistral config fields of a TinySpec."""
    return {
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
    }


def _llm_and_projector_state(
    spec: TinySpec, vocab: int, seed: int, family: str, rotary_buffers: bool
) -> dict[str, torch.Tensor]:
    """Random LLM + projector weights under LLaVA's state-dict names.

    ``rotary_buffers``: transformers 4.31 (LLaVA-1.5's release) saved each layer's rotary ``inv_freq``; 4.36 (1.6)
    did not.
    """
    torch.manual_seed(seed + 1)
    common = llm_config_kwargs(spec, vocab)
    if family == "mistral":
        llm = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "vicuna":
        llm = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny language model family {family!r}; expected 'vicuna' or 'mistral'")
    _randomize(llm, std=0.15)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    if rotary_buffers:
        head_dim = spec.hidden // spec.heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        for layer in range(spec.layers):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()

    projector_cfg = argparse.Namespace(
        mm_projector_type=spec.projector, mm_hidden_size=spec.vision_hidden, hidden_size=spec.hidden
    )
    projector = build_vision_projector(projector_cfg)
    _randomize(projector, std=0.2)
    for key, value in projector.state_dict().items():
        state[f"model.mm_projector.{key}"] = value.contiguous()
    return state


def _write_bin_shards(out: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        chunk = {k: state[k] for k in keys[index * per_shard : (index + 1) * per_shard]}
        torch.save(chunk, out / name)
        for key, value in chunk.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors_shards(out: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: state[k] for k in keys[index * per_shard : (index + 1) * per_shard]}
        save_file(chunk, str(out / name), metadata={"format": "pt"})
        for key, value in chunk.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--tower-out", default=None, help="CLIP tower folder (default: <out>-clip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--version",
        choices=["1.5", "1.6-vicuna", "1.6-mistral"],
        default="1.5",
        help="release layout to imitate (1.6: anyres, spatial_unpad, tuned tower in the checkpoint)",
    )
    args = parser.parse_args(argv)
    if args.version == "1.5":
        path = write_tiny_llava(args.out, seed=args.seed, tower_dir=args.tower_out)
    else:
        llm = args.version.split("-", 1)[1]
        path = write_tiny_llava_next(args.out, seed=args.seed, tower_dir=args.tower_out, llm=llm)
    print(f"wrote tiny LLaVA-{args.version} checkpoint to {path}")


if __name__ == "__main__":
    main()
