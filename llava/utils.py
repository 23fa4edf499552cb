"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from eval.common import INPUT_ERROR_STATUS


def quiet_transformers() -> None:
    """Entry points print answers, not load reports (the CLIP text tower is always 'unexpected')."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def looks_like_hub_id(name: str) -> bool:
    """'org/name' is a Hugging Face hub id; anything starting with . / ~ or with another number of slashes is a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1


CONV_MODE_PURPOSES = ("chat", "eval")


def default_conv_mode(model_name: str, model_config, purpose: str = "chat") -> str:
    """The conversation template when --conv-mode is not given: one rule for every entry point.

    Upstream chose it from the folder name; we look at the config first, then the name. Mistral, Yi-34B, Llama-2
    and MPT checkpoints have their own templates. For the Vicuna-based LLaVA-1.5 / 1.6 upstream used two:
    ``llava_v1`` in its interactive tools (run_llava, cli) and ``vicuna_v1`` in every evaluation script (the
    published numbers), so ``purpose="eval"`` (the benchmark runners) gives ``vicuna_v1``.
    """
    if purpose not in CONV_MODE_PURPOSES:
        raise ValueError(f"purpose must be one of {CONV_MODE_PURPOSES}, got {purpose!r}")
    model_type = getattr(model_config, "model_type", "")
    name = (model_name or "").lower()
    if model_type == "internvl_chat":  # InternVL2: the template its config.json names, for chat and evaluation alike
        return getattr(model_config, "template", None) or "Hermes-2"
    if model_type == "phi3_v":  # Phi-3-vision: its own chat template, for chat and evaluation alike
        return "phi3_v"
    if model_type == "llava_mistral" or "mistral" in name:
        return "mistral_instruct"
    if "34b" in name:
        return "chatml_direct"
    if "llama-2" in name or "llama2" in name:
        return "llava_llama_2"
    if "mpt" in name:
        return "mpt"
    return "vicuna_v1" if purpose == "eval" else "llava_v1"


def checkpoint_config(model_path: str) -> dict:
    """A checkpoint's config.json as a dict, without loading weights (a hub id fetches only that file)."""
    from llava.model.builder import CheckpointError, read_config

    folder = Path(os.path.expanduser(model_path))
    if folder.is_dir():
        return read_config(folder)
    if not looks_like_hub_id(model_path):
        raise CheckpointError(f"model folder not found: {model_path}")
    from huggingface_hub import hf_hub_download

    try:
        return read_config(Path(hf_hub_download(repo_id=model_path, filename="config.json")).parent)
    except Exception as err:  # the hub client raises many types (offline, 404, auth)
        raise CheckpointError(
            f"{model_path!r} is not a local folder and its config.json could not be fetched ({err})"
        ) from err


def resolved_tower(config: dict, model_path: str) -> str | None:
    """The vision tower the loader will use: ``mm_vision_tower``, a relative folder found next to the checkpoint."""
    from llava.model.builder import locate_relative_tower

    name = config.get("mm_vision_tower")
    folder = Path(os.path.expanduser(model_path))
    if name is None or not folder.is_dir():
        return name
    return locate_relative_tower(name, folder)


def add_model_args(parser: argparse.ArgumentParser, require_model_path: bool = True) -> argparse.ArgumentParser:
    """Upstream's model flags, plus device/dtype and an offline vision-tower override."""
    parser.add_argument(
        "--model-path", type=str, required=require_model_path, default=None, help="LLaVA checkpoint folder or hub id"
    )
    parser.add_argument("--model-base", type=str, default=None, help="base LLM for LoRA / projector-only folders")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--use-flash-attn", action="store_true", help="flash-attention 2 (needs the [flash] extra)")
    parser.add_argument("--vision-tower", type=str, default=None, help="local CLIP folder overriding mm_vision_tower")
    return parser


def load_from_args(args: argparse.Namespace, pruning_overrides: dict | None = None):
    """load_pretrained_model from the flags of add_model_args (+ pruning flags)."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(
        args.model_path,
        args.model_base,
        get_model_name_from_path(args.model_path),
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        device=args.device,
        use_flash_attn=args.use_flash_attn,
        vision_tower=args.vision_tower,
        pruning=pruning_overrides or None,
    )


def tower_depth(tower: str | None) -> int | None:
    """The number of encoder layers of a local vision-tower folder, from its config.json (None when unknown)."""
    if tower is None:
        return None
    config_file = Path(os.path.expanduser(tower)) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return config.get("vision_config", config).get("num_hidden_layers")


def check_before_loading(args: argparse.Namespace, pruning_overrides: dict | None = None):
    """What an entry point can check before the model loads (minutes for a 7B model): the checkpoint's config,
    the pruning settings resolved against it, and that ``--visual-layer`` exists in the vision tower. Returns the
    resolved PruningConfig; raises the errors ``user_errors`` lists."""
    from pruning import PruningConfigError, resolve_pruning

    config = checkpoint_config(args.model_path)
    pruning = resolve_pruning(config.get("pruning"), pruning_overrides)
    if pruning.visual_enabled:
        tower = getattr(args, "vision_tower", None) or resolved_tower(config, args.model_path)
        depth = tower_depth(tower)
        if depth is not None and pruning.visual_layer >= depth:
            raise PruningConfigError(
                f"--visual-layer {pruning.visual_layer}: the vision tower {tower} has {depth} layers "
                f"(valid: 0..{depth - 1})"
            )
    return pruning


def user_errors() -> tuple[type[Exception], ...]:
    """Mistakes in what a user passed (a missing folder or image, an out-of-range setting), as opposed to bugs:
    entry points print these as one ``error:`` line instead of a traceback."""
    from llava.mm_utils import ImageLoadError
    from llava.model.builder import CheckpointError
    from llava.model.multimodal_encoder.clip_encoder import VisionTowerError
    from pruning import PruningConfigError

    return (CheckpointError, VisionTowerError, PruningConfigError, ImageLoadError)


USER_ERROR_STATUS = INPUT_ERROR_STATUS  # bad input or settings: a rerun cannot help (the scripts tell them apart)


class UserErrorExit(SystemExit):
    """Exit status 2 with the ``error: ...`` line printed once to stderr and kept as ``str(exit)`` for callers."""

    def __init__(self, message: str) -> None:
        super().__init__(USER_ERROR_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exit_with_user_error(err: Exception) -> NoReturn:
    message = f"error: {err}"
    print(message, file=sys.stderr)
    raise UserErrorExit(message) from None


def run_entry_point(main, argv: list[str] | None = None):
    """Run an entry point's ``main(argv)``; a user error ends with one ``error: <message>`` line and status 2."""
    try:
        return main(argv)
    except user_errors() as err:
        exit_with_user_error(err)
