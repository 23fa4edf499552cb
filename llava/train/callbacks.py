"""What a LLaVA checkpoint folder needs beyond the adapter, gathered under ZeRO-3, and the training-log extras.

A LoRA folder that ``load_pretrained_model(path, base)`` reads has ``adapter_config.json`` + adapter weights (written
by the Trainer through peft), ``config.json`` (the LLaVA config: tower, projector type, pruning section) and
``non_lora_trainables.bin`` (every trained parameter outside LoRA, in practice the projector, under peft's key names
``base_model.model.model.mm_projector.*`` as upstream wrote them; plus the vision tower,
``base_model.model.model.vision_tower.vision_tower.*``, whenever it is tuned, even if frozen in this run).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import TrainerCallback

from llava.constants import NON_LORA_FILE

logger = logging.getLogger(__name__)


def unwrap_llava(model: nn.Module) -> nn.Module:
    """The LlavaLlamaForCausalLM inside a peft and/or DeepSpeed wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora_name(name: str) -> bool:
    return "lora_" in name


def gathered(params: list[nn.Parameter]):
    """ZeRO-3 partitions parameters across ranks; reading them whole needs a collective gather on every rank."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def non_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters outside LoRA, and, even when frozen, the projector (the base LLM has none) and a tuned
    vision tower (config ``unfreeze_mm_vision_tower``: trained in this run or taken from a base that was tuned; the
    CLIP folder does not have it), on the CPU. Collective under ZeRO-3: call it on every rank."""
    tuned_tower = bool(getattr(unwrap_llava(model).config, "unfreeze_mm_vision_tower", False))
    named = [
        (name, p)
        for name, p in model.named_parameters()
        if not is_lora_name(name)
        and (p.requires_grad or "mm_projector" in name or (tuned_tower and ".vision_tower." in name))
    ]
    with gathered([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named}


def save_llava_files(model: nn.Module, output_dir: str | Path, should_save: bool) -> None:
    """Write config.json and non_lora_trainables.bin next to what the Trainer saved (collective under ZeRO-3)."""
    model = getattr(model, "module", model)
    peft = isinstance(model, PeftModel)
    state = non_lora_state(model) if peft else {}
    if not should_save:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(unwrap_llava(model).config)
    config.use_cache = True  # training turns the cache off; the saved model is for inference
    config.save_pretrained(out)
    if peft:
        torch.save(state, out / NON_LORA_FILE)


def load_non_lora_trainables(model: nn.Module, folder: str | Path) -> None:
    """Restore the projector (and any other non-LoRA trained weights) of a checkpoint into a peft model."""
    file = Path(folder) / NON_LORA_FILE
    model = getattr(model, "module", model)
    if not file.is_file() or not isinstance(model, PeftModel):
        return
    state = torch.load(file, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"{file}: keys that match no parameter of the model being trained: {unknown[:8]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    logger.info("restored %d non-LoRA tensors from %s", len(state), file)


class PruningLogCallback(TrainerCallback):
    """Puts the stage-1 settings into the wandb run config (the per-step counts come from LLaVATrainer.log)."""

    def __init__(self, pruning: dict[str, Any], description: str) -> None:
        self.pruning = pruning
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            logger.info("stage-1 pruning during training: %s", self.description)
        if "wandb" not in (args.report_to or []) or not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is not None:
            wandb.config.update(
                {"pruning": self.pruning, "pruning_description": self.description}, allow_val_change=True
            )
