"""Recognise and load a Phi-3-vision checkpoint folder as released (``llava.model.builder`` routes here).

A folder is Phi-3-vision when its ``config.json`` says ``model_type: phi3_v`` (or names ``Phi3VForCausalLM``). It
must hold what the release holds: ``config.json``, safetensors weights (``model.safetensors.index.json`` and the
shards it names, or one ``model.safetensors``), ``tokenizer.json`` and ``preprocessor_config.json``. A missing
file, a shard the index names but the folder lacks, or a weight the model expects but the checkpoint lacks is a
``CheckpointError`` naming it.

The tokenizer is ``tokenizer.json`` read as is (transformers' generic tokenizers backend, as the official processor's
``LlamaTokenizerFast``). transformers 5's ``AutoTokenizer`` would build its own ``LlamaTokenizer`` from the vocabulary
and drop the file's normalizer, and with it the ``▁`` that Phi-3's legacy tokenizer writes after every special token
(``<|user|>\\n`` is ``[32010, 29871, 13]`` in the release, ``[32010, 13]`` that way).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from llava.model.phi3v.config import ARCHITECTURE, MODEL_TYPE, Phi3VConfigError, phi3v_config
from llava.model.phi3v.image_processing import PREPROCESSOR_FILE, Phi3VImageProcessor
from llava.model.phi3v.modeling import Phi3VForCausalLM
from pruning import PruningConfig, PruningConfigError, resolve_pruning

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# transformers 5's CLIPVisionModel has no inner `vision_model.` level; the release (transformers 4.38) has one
KEY_MAPPING = {
    r"^model\.vision_embed_tokens\.img_processor\.vision_model\.": "model.vision_embed_tokens.img_processor."
}
# the release's Phi3ImageEmbedding kept a reference to the word embeddings; a copy saved under this name is the same
# tensor as model.embed_tokens.weight and is not loaded twice
TIED_ALIAS = "model.vision_embed_tokens.wte.weight"


def is_phi3v_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config.get("architectures") or [])


def check_phi3v_folder(folder: Path) -> None:
    """Every file the release has must be there; the error names what is missing."""
    from llava.model.builder import CheckpointError

    missing = [name for name in (TOKENIZER_FILE, PREPROCESSOR_FILE) if not (folder / name).is_file()]
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        missing += sorted({name for name in weight_map.values() if not (folder / name).is_file()})
    elif not (folder / "model.safetensors").is_file():
        missing.append(f"{INDEX_FILE} (with its shards) or model.safetensors")
    if missing:
        raise CheckpointError(f"Phi-3-vision checkpoint {folder} is missing {', '.join(missing)}")


def load_phi3v_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """``tokenizer.json`` as it is, with BOS / EOS added as transformers 4.38's ``LlamaTokenizerFast`` (the official
    processor's tokenizer) added them: from ``add_bos_token`` / ``add_eos_token`` in ``tokenizer_config.json``
    (defaults true / false), whatever post-processor the file holds. transformers 5's generic backend would only
    follow the file."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Phi-3-vision checkpoint {folder} has no {TOKENIZER_FILE}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    config_file = folder / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    _llama_fast_post_processor(tokenizer, config.get("add_bos_token", True), config.get("add_eos_token", False))
    return tokenizer


def _llama_fast_post_processor(tokenizer: PreTrainedTokenizerFast, add_bos: bool, add_eos: bool) -> None:
    """LlamaTokenizerFast.update_post_processor of transformers 4.38: "<s> $A", and "$A </s>" with add_eos."""
    from llava.model.builder import CheckpointError

    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise CheckpointError(f"tokenizer_config.json asks for a BOS/EOS token the tokenizer lacks ({bos!r}, {eos!r})")
    single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
    special = [(bos, tokenizer.bos_token_id)] if add_bos else []
    special += [(eos, tokenizer.eos_token_id)] if add_eos else []
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def load_phi3v(
    folder: Path,
    raw_config: dict[str, Any],
    load_kwargs: dict[str, Any],
    pruning: dict[str, Any] | None = None,
    model_base: str | None = None,
    vision_tower: str | None = None,
):
    """``(tokenizer, model, image_processor, context_len)`` for a Phi-3-vision folder, like load_pretrained_model."""
    from llava.model.builder import CheckpointError

    if vision_tower is not None:
        warnings.warn(
            f"--vision-tower {vision_tower} is ignored: Phi-3-vision's CLIP tower is in the checkpoint {folder}",
            stacklevel=3,
        )
    if model_base is not None:
        raise CheckpointError(f"{folder} is a full Phi-3-vision checkpoint; --model-base {model_base} does not apply")
    if load_kwargs.get("quantization_config") is not None:
        raise CheckpointError("--load-8bit / --load-4bit are not supported for Phi-3-vision checkpoints")
    check_phi3v_folder(folder)
    try:
        config = phi3v_config(raw_config, source=str(folder / "config.json"))
    except Phi3VConfigError as err:
        raise CheckpointError(str(err)) from None
    resolved = resolve_pruning(getattr(config, "pruning", None), pruning)
    _check_visual_layer(resolved, config, folder)
    config.pruning = resolved.to_dict()
    model, info = Phi3VForCausalLM.from_pretrained(
        folder, config=config, key_mapping=KEY_MAPPING, output_loading_info=True, **load_kwargs
    )
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    unexpected = [k for k in info["unexpected_keys"] if k != TIED_ALIAS]
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: the weights do not match Phi-3-vision (missing: {missing[:6]}, unexpected: {unexpected[:6]})"
        )
    tokenizer = load_phi3v_tokenizer(folder)
    _stop_at_end_token(model, tokenizer)
    model.set_pruning(config.pruning)
    embed = model.get_model().vision_embed_tokens
    processor = Phi3VImageProcessor.from_pretrained(folder, crop_size=embed.crop_size, merged_side=embed.merged_side)
    model.eval()
    return tokenizer, model, processor, int(config.max_position_embeddings)


def _check_visual_layer(pruning: PruningConfig, config, folder: Path) -> None:
    """Before the weights load: with stage 1 on, every crop is scored at visual_layer, so the layer must exist;
    'inside' mode must prune before the select layer."""
    if not pruning.visual_enabled:
        return
    depth = int(config.clip_config_dict()["num_hidden_layers"])
    if not 0 <= pruning.visual_layer < depth:
        raise PruningConfigError(
            f"--visual-layer {pruning.visual_layer}: the CLIP tower of {folder} has {depth} layers "
            f"(valid: 0..{depth - 1})"
        )
    select = config.tower_select_layer + depth + 1 if config.tower_select_layer < 0 else config.tower_select_layer
    if pruning.visual_mode == "inside" and pruning.visual_layer > select:
        raise PruningConfigError(
            f"--visual-mode inside prunes at hidden_states[{pruning.visual_layer}], after the select layer "
            f"hidden_states[{select}] of {folder}; use a --visual-layer <= {select} or --visual-mode select"
        )


def _stop_at_end_token(model: torch.nn.Module, tokenizer) -> None:
    """The official sample generates with eos_token_id=tokenizer.eos_token_id (<|end|>); config.json says 2. Stop at
    the tokenizer's EOS first, and at the generation config's ids as well."""
    eos = model.generation_config.eos_token_id
    ids = [tokenizer.eos_token_id] + (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    model.generation_config.eos_token_id = list(dict.fromkeys(i for i in ids if i is not None))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
