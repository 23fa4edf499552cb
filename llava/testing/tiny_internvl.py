"""Write a tiny random InternVL2 checkpoint in the release's folder layout, for tests:

    python -m llava.testing.tiny_internvl --out checkpoints/internvl2-tiny

Like OpenGVLab/InternVL2-1B: ``config.json`` (``model_type`` "internvl_chat", ``llm_config`` a Qwen2 config in the
4.x key style asking for flash-attention, ``vision_config`` an InternViT config, ``auto_map``, template "Hermes-2",
pixel shuffle v2, 1-12 tiles + thumbnail), one bf16 ``model.safetensors`` with ``vision_model.*``, ``mlp1.*``,
``language_model.*`` (a separate ``lm_head``), ``generation_config.json`` and the slow Qwen2 tokenizer files (a BPE
trained on the spot, the release's special tokens after its vocabulary). Only the sizes are small.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llava.model.internvl.configuration_internvl_chat import InternVLChatConfig
from llava.model.internvl.conversation import HERMES_2_SYSTEM_MESSAGE
from llava.model.internvl.modeling_internvl_chat import InternVLChatModel
from llava.model.internvl.tokenization import SPECIAL_TOKENS, write_bpe_tokenizer


@dataclass
class TinyInternVLSpec:
    """Sizes of the tiny model: 112-pixel tiles of 8x8 patches, 16 merged tokens per tile."""

    tile_size: int = 112
    tower_image_size: int | None = None  # the position table's size (default: tile_size; else interpolated)
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 64
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    bpe_vocab: int = 400
    max_dynamic_patch: int = 12
    visual_layer: int = 2
    dtype: str = "bfloat16"


def tokenizer_corpus() -> list[str]:
    """The template's strings and the benchmark prompts, so the tiny vocabulary is not all bytes."""
    lines = [
        HERMES_2_SYSTEM_MESSAGE,
        "<|im_start|>user\n<image>\nWhat is shown in the image?<|im_end|><|im_start|>assistant\nA red circle.",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Is there a red circle in the image? Please answer yes or no. Yes No",
        "A. yes\nB. no\nC. maybe\nD. none",
        "Describe the image in detail. The picture shows a cat sitting on a chair next to a window.",
        "请直接回答选项字母。 图中有几个物体？ 0 1 2 3 4 5 6 7 8 9",
    ]
    return lines * 3


def config_dict(spec: TinyInternVLSpec, vocab_size: int, pruning: dict | None) -> dict[str, Any]:
    """config.json in the release's shape (keys as the 4.x remote code wrote them)."""
    special = {token: i for i, token in enumerate(SPECIAL_TOKENS, start=vocab_size - len(SPECIAL_TOKENS))}
    llm = {
        "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "_attn_implementation": "flash_attention_2",
    }
    vision = {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": spec.vision_hidden,
        "image_size": spec.tower_image_size or spec.tile_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": spec.vision_intermediate,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "layer_norm",
        "num_attention_heads": spec.vision_heads,
        "num_channels": 3,
        "num_hidden_layers": spec.vision_layers,
        "patch_size": spec.patch_size,
        "qk_normalization": False,
        "qkv_bias": True,
        "torch_dtype": "bfloat16",
        "use_bfloat16": True,
        "use_flash_attn": True,
    }
    config = {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": spec.tile_size,
        "llm_config": llm,
        "max_dynamic_patch": spec.max_dynamic_patch,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "Hermes-2",
        "torch_dtype": "bfloat16",
        "transformers_version": None,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision,
    }
    # the tiny tower has few layers: point stage 1 at one that exists (pruning stays off unless asked)
    config["pruning"] = {"visual_layer": spec.visual_layer, **(pruning or {})}
    return config


def random_state(config: InternVLChatConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights large enough that outputs differ between images, tiles and prompts (norms and layer scales
    random too, so a swapped or missing parameter shows in the logits)."""
    torch.manual_seed(seed)
    model = InternVLChatModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ls1", "ls2")) or ("norm" in name and name.endswith("weight")) or ".mlp1.0." in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.05)
            elif "embedding" in name and "patch" not in name:
                param.normal_(0, 0.5)
            elif "attn.qkv.weight" in name:  # sharp attention: CLS curves with a head and a long tail, as trained
                param.normal_(0, 0.4)
            else:
                param.normal_(0, 0.08)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_tiny_internvl(
    out: str | Path, spec: TinyInternVLSpec | None = None, seed: int = 0, pruning: dict | None = None
) -> Path:
    spec = spec or TinyInternVLSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_bpe_tokenizer(out, tokenizer_corpus(), vocab_size=spec.bpe_vocab)
    raw = config_dict(spec, vocab_size, pruning)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "auto_map")}
    state = random_state(InternVLChatConfig(**fields), seed)
    dtype = getattr(torch, spec.dtype)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    special = {token: i for i, token in enumerate(SPECIAL_TOKENS, start=vocab_size - len(SPECIAL_TOKENS))}
    generation = {
        "_from_model_config": True,
        "eos_token_id": [special["<|im_start|>"], special["<|im_end|>"]],
        "transformers_version": "4.37.2",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote tiny InternVL2 checkpoint to {write_tiny_internvl(args.out, seed=args.seed)}")


if __name__ == "__main__":
    main()
