"""Write a tiny random Phi-3-vision checkpoint in the release's folder layout, for tests.

    python -m llava.testing.tiny_phi3v --out checkpoints/phi3v-tiny

The folder looks like microsoft/Phi-3-vision-128k-instruct: ``config.json`` (model_type phi3_v, ``embd_layer``,
``img_processor``, LongRoPE as ``rope_scaling {"type": "su"}``, ``sliding_window`` = ``max_position_embeddings``),
two safetensors shards with ``model.safetensors.index.json`` under the release's names (CLIP under
``model.vision_embed_tokens.img_processor.vision_model.*``), ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json`` (a Llama-style BPE with byte fallback trained on the spot, with Phi-3's chat tokens after
the sentencepiece vocabulary, as in the release), ``preprocessor_config.json`` (num_crops) and
``generation_config.json``. The tower keeps the release's geometry (336-pixel crops, 14-pixel patches: 24 x 24
patches, 12 x 12 merged tokens) and is only narrow; ``img_processor.clip_config`` describes it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3ForCausalLM
from transformers.tokenization_utils_base import generate_merges

from llava.model.phi3v.config import CLIP_VIT_L14_336, phi3v_config
from llava.model.phi3v.image_processing import CLIP_MEAN, CLIP_STD
from llava.testing.tiny_llava import tokenizer_corpus
from llava.tokenization import train_sentencepiece

# Phi-3's added tokens, in the release's order after the 32000 sentencepiece pieces (32000 .. 32010)
CHAT_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)


@dataclass
class TinyPhi3VSpec:
    """Sizes of the tiny model; crops keep the release's 336 px / 14 px geometry."""

    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    vocab_size: int = 400  # sentencepiece pieces (an upper bound); chat tokens come on top
    original_max_position_embeddings: int = 4096  # the release's; LongRoPE's short factors up to here
    max_position_embeddings: int = 131072
    num_crops: int = 4
    visual_layer: int = 2


def chat_corpus() -> list[str]:
    """LLaVA's tiny corpus plus Phi-3 chat turns, so the tiny vocabulary covers both."""
    turns = [
        "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\nA red circle.<|end|>",
        "<|user|>\nAnswer with the option's letter from the given choices directly.<|end|>\n<|assistant|>\nA<|end|>",
        "Answer the question using a single word or phrase. Is there a dog? Yes<|end|>",
    ]
    return tokenizer_corpus() + turns * 3


def build_tokenizer(out: Path, vocab_size: int, seed: int) -> dict[str, int]:
    """Train a sentencepiece BPE, convert it to a ``tokenizer.json`` shaped like Phi-3's (legacy Llama: a ``▁``
    prepended to every text segment, spaces as ``▁``, byte fallback, BOS added), add the chat tokens; returns the
    whole vocabulary (token -> id)."""
    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece(chat_corpus(), tmp, vocab_size=vocab_size, seed=seed)
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True, lstrip=False, rstrip=False) for t in CHAT_TOKENS]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": (
            "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
            "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
            "{{- '<|assistant|>\\n' -}}{% endif %}"
        ),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "<|end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tokenizer.get_vocab(with_added_tokens=True)


def tiny_clip_config(spec: TinyPhi3VSpec) -> dict[str, Any]:
    return {
        **CLIP_VIT_L14_336,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 4,
        "num_attention_heads": spec.vision_heads,
        "num_hidden_layers": spec.vision_layers,
    }


def release_config(spec: TinyPhi3VSpec, vocab: int, pad_id: int, pruning: dict | None = None) -> dict[str, Any]:
    """config.json as the release writes it, with the tiny sizes. The release has no pad_token_id: Phi-3's default
    32000 is its <|endoftext|>; the tiny one names its own."""
    head_dim = spec.hidden // spec.heads
    rotary = head_dim // 2
    config = {
        "_name_or_path": "Phi-3-vision-128k-instruct",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "bos_token_id": 1,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "img_processor": {
            "image_dim_out": spec.vision_hidden,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "clip_config": tiny_clip_config(spec),
        },
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "phi3_v",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.heads,
        "original_max_position_embeddings": spec.original_max_position_embeddings,
        "pad_token_id": pad_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + 0.75 * i for i in range(rotary)],
            "short_factor": [1.0 + 0.1 * i for i in range(rotary)],
            "type": "su",
        },
        "rope_theta": 10000.0,
        "sliding_window": spec.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": vocab,
        "_attn_implementation": "flash_attention_2",
    }
    # the tiny tower has few layers: point stage 1 at one that exists (pruning stays off unless asked)
    config["pruning"] = {"visual_layer": spec.visual_layer, **(pruning or {})}
    return config


def _randomize(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
            else:
                param.normal_(0, std)


def release_state(spec: TinyPhi3VSpec, config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the release's names."""
    torch.manual_seed(seed)
    llm = Phi3ForCausalLM(phi3v_config(config))
    _randomize(llm, std=0.15)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    tower = CLIPVisionModel(CLIPVisionConfig(**tiny_clip_config(spec)))
    _randomize(tower, std=0.2)
    prefix = "model.vision_embed_tokens."
    for key, value in tower.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a non-persistent buffer, not in the release
        state[f"{prefix}img_processor.vision_model.{key}"] = value.contiguous()
    merged = 4 * spec.vision_hidden
    state[f"{prefix}glb_GN"] = torch.randn(1, 1, merged) * 0.5
    state[f"{prefix}sub_GN"] = torch.randn(1, 1, 1, merged) * 0.5
    state[f"{prefix}img_projection.0.weight"] = torch.randn(spec.hidden, merged) * 0.2
    state[f"{prefix}img_projection.0.bias"] = torch.randn(spec.hidden) * 0.02
    state[f"{prefix}img_projection.2.weight"] = torch.randn(spec.hidden, spec.hidden) * 0.2
    state[f"{prefix}img_projection.2.bias"] = torch.randn(spec.hidden) * 0.02
    return state


def write_shards(out: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, the LLM first as in the release."""
    keys = sorted(state, key=lambda k: (k.startswith("model.vision_embed_tokens."), k))
    per_shard = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[shard * per_shard : (shard + 1) * per_shard]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_phi3v(
    out: str | Path, spec: TinyPhi3VSpec | None = None, seed: int = 0, pruning: dict | None = None
) -> Path:
    """Write the checkpoint folder ``out``; returns it."""
    spec = spec or TinyPhi3VSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = build_tokenizer(out, spec.vocab_size, seed)
    vocab = -(-len(tokens) // 64) * 64  # the release pads the embedding rows (32064 for 32011 tokens)
    pad = tokens["<|endoftext|>"]
    config = release_config(spec, vocab, pad, pruning)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_shards(out, release_state(spec, config, seed))
    preprocessor = {  # the release's keys
        "auto_map": {
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        },
        "num_crops": spec.num_crops,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": list(CLIP_STD),
        "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    # made from config.json (eos 2, as the release's config says); the loader adds the tokenizer's <|end|>
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-crops", type=int, default=TinyPhi3VSpec.num_crops)
    args = parser.parse_args(argv)
    print(write_tiny_phi3v(args.out, TinyPhi3VSpec(num_crops=args.num_crops), seed=args.seed))


if __name__ == "__main__":
    main()
