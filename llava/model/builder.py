"""`load_pretrained_model`: upstream's entry point, choosing the loading route from the files present.

Routes (upstream chose them from substrings of the folder name; we look at the files and the config):
- LoRA: ``adapter_config.json`` + adapter weights + ``non_lora_trainables.bin`` on top of ``model_base``, merged;
- projector only: ``mm_projector.bin`` and no LLM weights, on top of ``model_base``;
- full LLaVA checkpoint: LLM + projector weights, ``mm_vision_tower`` in the config;
- plain language model: a config without ``mm_vision_tower``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from llava.constants import NON_LORA_FILE
from llava.model.internvl.configuration_internvl_chat import is_internvl_config
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from llava.model.phi3v import is_phi3v_config, load_phi3v
from llava.tokenization import load_tokenizer
from llava.utils import looks_like_hub_id
from pruning import PruningConfig, resolve_pruning

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# model_type in config.json -> (config class, model class). "llava" is LLaVA-1.5's release config; the 1.6
# releases say "llava_llama" (Vicuna, and Yi for the 34B) or "llava_mistral".
LLAVA_MODEL_TYPES = {
    "llava": (LlavaConfig, LlavaLlamaForCausalLM),
    "llava_llama": (LlavaConfig, LlavaLlamaForCausalLM),
    "llava_mistral": (LlavaMistralConfig, LlavaMistralForCausalLM),
}


class CheckpointError(OSError):
    """A checkpoint folder is missing files or its files contradict each other; the message names them."""


def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """A local folder, or a hub id fetched into (or found in) the Hugging Face cache."""
    path = Path(os.path.expanduser(str(model_path)))
    if path.is_dir():
        return path
    name = str(model_path)
    if not looks_like_hub_id(name):
        raise CheckpointError(f"model folder not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub ({err})"
        ) from err


def read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint folder {folder} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{config_file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("model-*.safetensors"))


def detect_route(folder: Path, config: dict[str, Any], model_base: str | None) -> str:
    """'lora', 'projector', 'llava' or 'language_model', from the files in ``folder``."""
    if (folder / "adapter_config.json").is_file():
        missing = [] if any((folder / f).is_file() for f in ADAPTER_FILES) else ["adapter_model.safetensors|.bin"]
        if "mm_vision_tower" in config and not (folder / NON_LORA_FILE).is_file():
            missing.append(NON_LORA_FILE)
        if missing:
            raise CheckpointError(f"LoRA checkpoint {folder} is missing {', '.join(missing)}")
        if model_base is None:
            raise CheckpointError(
                f"{folder} is a LoRA checkpoint (adapter_config.json): pass the base LLM with --model-base "
                "(e.g. lmsys/vicuna-7b-v1.5)"
            )
        return "lora"
    if "mm_vision_tower" not in config:
        if not has_weights(folder):
            raise CheckpointError(f"{folder} has a config but no weights ({', '.join(WEIGHT_FILES)})")
        return "language_model"
    if has_weights(folder):
        if model_base is not None:
            warnings.warn(f"{folder} holds full weights; --model-base {model_base} is ignored", stacklevel=3)
        return "llava"
    if (folder / "mm_projector.bin").is_file():
        if model_base is None:
            raise CheckpointError(f"{folder} holds only mm_projector.bin: pass the base LLM with --model-base")
        return "projector"
    raise CheckpointError(f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES)} or mm_projector.bin")


def locate_relative_tower(name: str, folder: Path) -> str:
    """A relative tower path that does not exist from the working directory is looked up next to the checkpoint
    (and up to three folders above it), so a checkpoint shipped with its tower loads from anywhere."""
    if os.path.isabs(name) or os.path.isdir(name):
        return name
    for base in [folder, *folder.resolve().parents[:3]]:
        candidate = base / name
        if (candidate / "config.json").is_file():
            return str(candidate)
    return name  # a hub id, or a missing folder reported by the tower


def llava_config(config: dict[str, Any], source: Path) -> LlavaConfig | LlavaMistralConfig:
    model_type = config.get("model_type")
    if model_type not in LLAVA_MODEL_TYPES:
        raise CheckpointError(
            f"{source}/config.json: model_type {model_type!r} is not a LLaVA checkpoint we can load "
            f"(expected one of {sorted(LLAVA_MODEL_TYPES)})"
        )
    config_class, _ = LLAVA_MODEL_TYPES[model_type]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    if config.get("image_aspect_ratio") == "anyres" and not config.get("image_grid_pinpoints"):
        raise CheckpointError(
            f"{source}/config.json: image_aspect_ratio is 'anyres' but image_grid_pinpoints is missing"
        )
    return config_class(**fields)


def llava_model_class(config: dict[str, Any]) -> type:
    """The model class for a raw config whose model_type llava_config() accepted."""
    return LLAVA_MODEL_TYPES[config["model_type"]][1]


def strip_non_lora_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.model.model.mm_projector.0.weight`` -> ``model.mm_projector.0.weight``."""
    out = {}
    for key, value in state.items():
        if key.startswith("base_model."):
            key = key[len("base_model.") :]
        if key.startswith("model.model."):
            key = key[len("model.") :]
        out[key] = value
    return out


def _load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{source}: keys that match no parameter of the model: {result.unexpected_keys[:8]}")


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = "auto",
    device: str = "cuda",
    use_flash_attn: bool = False,
    dtype: torch.dtype | None = None,
    vision_tower: str | None = None,
    pruning: PruningConfig | dict | None = None,
    **kwargs: Any,
):
    """Load a LLaVA checkpoint. Returns ``(tokenizer, model, image_processor, context_len)`` as upstream.

    ``model_name`` is accepted for upstream compatibility; the route comes from the files. ``vision_tower``
    overrides ``mm_vision_tower`` (e.g. a local CLIP folder on an offline machine); ``pruning`` overrides the
    checkpoint's pruning section (a PruningConfig, or a dict of changed fields).
    """
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    if device != "cuda":
        device_map = {"": device}
    if dtype is None:
        dtype = torch.float16 if device == "cuda" else torch.float32
    load_kwargs: dict[str, Any] = {"device_map": device_map, "dtype": dtype, **kwargs}
    if load_8bit or load_4bit:
        if find_spec("bitsandbytes") is None:
            raise ImportError("--load-8bit/--load-4bit need bitsandbytes: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if load_8bit
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=torch.float16,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_quant_type="nf4",
            )
        )
    if use_flash_attn:
        if find_spec("flash_attn") is None:
            raise ImportError("use_flash_attn needs flash-attn: pip install -e '.[flash]' --no-build-isolation")
        load_kwargs["attn_implementation"] = "flash_attention_2"
    else:
        load_kwargs.setdefault("attn_implementation", "sdpa")

    folder = resolve_model_path(model_path)
    raw_config = read_config(folder)
    if is_phi3v_config(raw_config):  # Phi-3-vision's own release layout (llava/model/phi3v/loader.py)
        return load_phi3v(folder, raw_config, load_kwargs, _overrides(pruning), model_base, vision_tower)
    if is_internvl_config(raw_config):  # InternVL2's own release layout (llava/model/internvl/builder.py)
        from llava.model.internvl.builder import load_internvl  # it imports this module

        return load_internvl(folder, raw_config, model_base, vision_tower, pruning, load_kwargs)
    route = detect_route(folder, raw_config, model_base)
    base = resolve_model_path(model_base) if route in ("lora", "projector") else None

    if route == "language_model":
        tokenizer = load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
        return tokenizer, model, None, getattr(model.config, "max_sequence_length", 2048)

    config = llava_config(raw_config, folder)
    model_class = llava_model_class(raw_config)
    if vision_tower is not None:
        config.mm_vision_tower = str(vision_tower)
    else:
        config.mm_vision_tower = locate_relative_tower(config.mm_vision_tower, folder)
    config.pruning = resolve_pruning(getattr(config, "pruning", None), _overrides(pruning)).to_dict()
    # LLaVA-1.6 fine-tuned the tower and saved it in the checkpoint. Upstream built the tower at init so the
    # checkpoint's weights landed in it; transformers 5 inits on the meta device, where a nested from_pretrained
    # fails, so the tower is delay-loaded here and its tuned weights are read from the checkpoint afterwards.
    tuned_tower = bool(getattr(config, "unfreeze_mm_vision_tower", False))
    config.unfreeze_mm_vision_tower = False
    tower_tensors = None  # a LoRA run's tuned tower, from non_lora_trainables.bin
    tower_source = folder
    if route == "llava":
        model = model_class.from_pretrained(folder, config=config, **load_kwargs)
        tokenizer_dir = folder
    else:
        model = model_class.from_pretrained(base, config=config, **load_kwargs)
        tokenizer_dir = folder if (folder / "tokenizer.model").is_file() else base
        if route == "projector":
            weights = torch.load(folder / "mm_projector.bin", map_location="cpu", weights_only=True)
            _load_state_into(model, {k: v.to(dtype) for k, v in weights.items()}, folder / "mm_projector.bin")
        else:
            adapted, tower_tensors = _load_lora(model, folder, dtype)
            model = adapted.merge_and_unload()
        if not tower_tensors and read_config(base).get("unfreeze_mm_vision_tower"):
            # the folder brings no tower but its base was tuned: that tower is the one training saw (LoRA folders
            # written before non_lora_trainables.bin carried a base's tuned tower, issue #26, say false here)
            tuned_tower, tower_source, tower_tensors = True, base, None
    tokenizer = load_tokenizer(tokenizer_dir)
    model.set_pruning(config.pruning)

    tower = model.get_vision_tower()
    tower.load_model(device_map=None, dtype=dtype)
    if tuned_tower:
        model.config.unfreeze_mm_vision_tower = True
        load_tuned_tower(tower, tower_source, dtype, tensors=tower_tensors)
    tower.to(device=model.device, dtype=dtype)
    image_processor = tower.image_processor
    context_len = getattr(model.config, "max_sequence_length", 2048)
    model.eval()
    return tokenizer, model, image_processor, context_len


TOWER_PREFIX = "model.vision_tower."


def checkpoint_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder whose names start with ``prefix`` (safetensors or .bin, sharded or not)."""
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({folder / name for key, name in weight_map.items() if key.startswith(prefix)})
            break
    else:
        files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return out


def load_tuned_tower(
    tower: torch.nn.Module, folder: Path, dtype: torch.dtype, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Overwrite the CLIP folder's weights with the fine-tuned tower saved in the checkpoint (LLaVA-1.6), or with
    ``tensors`` (``model.vision_tower.*`` names) already read from a LoRA run's non_lora_trainables.bin."""
    own = set(tower.state_dict())
    if tensors is None:
        tensors = checkpoint_tensors(folder, TOWER_PREFIX)
    state = {}
    for key, value in tensors.items():
        key = key[len(TOWER_PREFIX) :]
        # released with transformers 4.x: CLIPVisionModel.vision_model.*; transformers 5 drops that level
        if key not in own and key.startswith("vision_tower.vision_model."):
            key = "vision_tower." + key[len("vision_tower.vision_model.") :]
        state[key] = value.to(dtype)
    if not state:
        warnings.warn(
            f"{folder}/config.json sets unfreeze_mm_vision_tower but the checkpoint holds no '{TOWER_PREFIX}*' "
            "weights; using the vision tower folder's weights",
            stacklevel=3,
        )
        return
    result = tower.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{folder}: the vision tower weights in the checkpoint do not match the tower "
            f"(unexpected: {result.unexpected_keys[:5]}, missing: {missing[:5]})"
        )


def _overrides(pruning: PruningConfig | dict | None) -> dict[str, Any]:
    if pruning is None:
        return {}
    if isinstance(pruning, PruningConfig):
        return pruning.to_dict()
    return dict(pruning)


def _load_lora(model, folder: Path, dtype: torch.dtype):
    """Load non_lora_trainables.bin, then wrap with the adapter (merged by the caller). Returns (wrapped model, the
    file's tuned-tower tensors): the tower is not built yet, load_pretrained_model loads them once it is."""
    from peft import PeftModel

    non_lora_file = folder / NON_LORA_FILE
    tower: dict[str, torch.Tensor] = {}
    if non_lora_file.is_file():
        state = strip_non_lora_keys(torch.load(non_lora_file, map_location="cpu", weights_only=True))
        tower = {k: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
        rest = {k: v.to(dtype) for k, v in state.items() if k not in tower}
        _load_state_into(model, rest, non_lora_file)
    return PeftModel.from_pretrained(model, str(folder)), tower
