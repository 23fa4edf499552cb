"""Recognising and loading an InternVL2 checkpoint folder as released (OpenGVLab/InternVL2-1B), without remote code.

``llava.model.builder.load_pretrained_model`` hands a folder here when ``is_internvl_config`` says its config.json
is InternVL's; everything else about the family (which files must be there, which settings are supported, the token
ids the model needs from the tokenizer) is decided in this module.

The folder, as released: ``config.json`` (``model_type`` "internvl_chat", ``llm_config``, ``vision_config``),
``model.safetensors`` (or shards with their index) holding ``vision_model.*``, ``mlp1.*`` and ``language_model.*``,
the slow Qwen2 tokenizer files. ``auto_map`` and the remote-code files are ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from llava.model.builder import WEIGHT_FILES, CheckpointError, _overrides, has_weights
from llava.model.internvl.configuration_internvl_chat import (
    HF_MODEL_TYPE,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    MODEL_TYPE,
    InternVLChatConfig,
    InternVLConfigError,
    check_supported,
)
from llava.model.internvl.conversation import STOP_TOKEN, TEMPLATES
from llava.model.internvl.image_processing import InternVLImageProcessor
from llava.model.internvl.modeling_internvl_chat import InternVLChatModel
from llava.model.internvl.tokenization import TokenizerFilesError, load_internvl_tokenizer
from pruning import PruningConfig, PruningConfigError, resolve_pruning


def internvl_config(raw: dict[str, Any], folder: Path) -> InternVLChatConfig:
    """The model config from a released config.json; unsupported or foreign settings name the file and key."""
    source = f"{folder}/config.json"
    if raw.get("model_type") == HF_MODEL_TYPE:
        raise CheckpointError(
            f"{source}: model_type 'internvl' is transformers' converted InternVL layout (an '-hf' repository); this "
            "loader reads the original release (model_type 'internvl_chat', e.g. OpenGVLab/InternVL2-1B)"
        )
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    try:
        check_supported(raw, source)
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "auto_map")}
        config = InternVLChatConfig(**fields)
    except (InternVLConfigError, TypeError, ValueError) as err:
        raise CheckpointError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None
    if config.template not in TEMPLATES:
        raise CheckpointError(
            f"{source}: template {config.template!r} is not implemented (known: {', '.join(TEMPLATES)})"
        )
    return config


def load_internvl(
    folder: Path,
    raw_config: dict[str, Any],
    model_base: str | None = None,
    vision_tower: str | None = None,
    pruning: PruningConfig | dict | None = None,
    load_kwargs: dict[str, Any] | None = None,
):
    """``(tokenizer, model, image_processor, context_len)`` for an InternVL2 folder, as ``load_pretrained_model``.

    ``load_kwargs`` are the builder's ``from_pretrained`` arguments (device_map, dtype, attn_implementation); 8/4-bit
    quantisation is refused. The LoRA and projector-only routes do not exist for this family.
    """
    load_kwargs = dict(load_kwargs or {})
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder} is a LoRA adapter on an InternVL model; only merged InternVL checkpoints load")
    if load_kwargs.pop("quantization_config", None) is not None:
        raise CheckpointError(f"{folder}: --load-8bit / --load-4bit are not supported for InternVL checkpoints")
    if model_base is not None:
        warnings.warn(f"{folder} is a full InternVL checkpoint; --model-base {model_base} is ignored", stacklevel=3)
    if vision_tower is not None:
        warnings.warn(f"{folder} holds its own InternViT tower; --vision-tower {vision_tower} is ignored", stacklevel=3)
    config = internvl_config(raw_config, folder)
    if not has_weights(folder):
        raise CheckpointError(f"InternVL checkpoint {folder} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    try:
        tokenizer = load_internvl_tokenizer(folder)
    except TokenizerFilesError as err:
        raise CheckpointError(str(err)) from None
    config.img_start_token_id = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    config.img_end_token_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    config.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    resolved = resolve_pruning(config.pruning, _overrides(pruning))
    depth = config.vision_config.num_hidden_layers
    if resolved.visual_layer >= depth:  # the tiles are scored whatever the rule, so this holds with pruning off too
        raise PruningConfigError(
            f"--visual-layer {resolved.visual_layer}: the InternViT tower of {folder} has {depth} layers "
            f"(valid: 0..{depth - 1})"
        )
    config.pruning = resolved.to_dict()
    vocab = config.llm_config.vocab_size
    if len(tokenizer) > vocab:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but llm_config.vocab_size is {vocab}; "
            "tokenizer and weights come from different checkpoints"
        )

    load_kwargs.setdefault("attn_implementation", "sdpa")
    load_kwargs.setdefault("dtype", torch.float32)
    model, info = InternVLChatModel.from_pretrained(folder, config=config, output_loading_info=True, **load_kwargs)
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{folder}: the weights do not match InternVL2 built from its config.json "
            f"(missing: {sorted(missing)[:6]}, unexpected: {sorted(unexpected)[:6]}, wrong shape: {list(mismatched)[:3]})"
        )
    stop = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    generation = model.language_model.generation_config
    generation.eos_token_id = stop  # the official chat() stops at the template's separator
    generation.pad_token_id = tokenizer.pad_token_id
    model.eval()
    processor = InternVLImageProcessor.from_model_config(config)
    context_len = int(getattr(config.llm_config, "max_position_embeddings", 2048))
    return tokenizer, model, processor, context_len
