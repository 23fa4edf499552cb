"""The transformers Trainer with LLaVA's changes: modality-grouped batches, a projector learning rate, LLaVA files
in every checkpoint, and the stage-1 token counts and each parameter group's learning rate in the logs.

Upstream wrote ``non_lora_trainables.bin`` and ``config.json`` only at the end of training, so no intermediate
``checkpoint-N`` could be loaded or fully resumed (its projector came back untrained). Here ``save_model`` writes
them next to the adapter every time the Trainer saves, and resuming without DeepSpeed reloads the projector too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer

from llava.train.callbacks import load_non_lora_trainables, save_llava_files

PROJECTOR_KEYS = ("mm_projector", "vision_resampler")


# ---- sampling -------------------------------------------------------------------------------------------------
def split_evenly(indices: Sequence[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """``parts`` equal-size groups with similar total length: longest first, each to the lightest open group."""
    if len(indices) % parts:
        raise ValueError(f"{len(indices)} indices cannot be split into {parts} equal parts")
    size = len(indices) // parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for index in sorted(indices, key=lambda i: -abs(lengths[i])):
        open_groups = [g for g in range(parts) if len(groups[g]) < size]
        target = min(open_groups, key=lambda g: totals[g])
        groups[target].append(index)
        totals[target] += abs(lengths[index])
    return groups


def modality_grouped_indices(
    lengths: Sequence[int], batch_size: int, replicas: int, generator: torch.Generator
) -> list[int]:
    """An order in which every optimizer step sees one modality (image or text-only) at similar lengths.

    ``lengths`` are word counts, negative for text-only samples. One step consumes ``batch_size * replicas``
    consecutive indices (replicas = processes x accumulation steps); within such a megabatch the samples are split
    into ``replicas`` chunks of ``batch_size`` with balanced lengths. The two modalities' last partial megabatches
    are merged into a final mixed one.
    """
    megabatch = batch_size * replicas
    full: list[list[int]] = []
    leftover: list[int] = []
    for want_image in (True, False):
        group = [i for i, length in enumerate(lengths) if (length > 0) == want_image]
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        chunks = [order[i : i + megabatch] for i in range(0, len(order), megabatch)]
        if chunks and len(chunks[-1]) < megabatch:
            leftover += chunks.pop()
        full += chunks
    ordered = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if leftover:
        ordered.append(leftover)
    out: list[int] = []
    for chunk in ordered:
        if len(chunk) == megabatch:
            out += [i for part in split_evenly(chunk, lengths, replicas) for i in part]
        else:
            out += sorted(chunk, key=lambda i: -abs(lengths[i]))
    return out


class ModalityLengthGroupedSampler(Sampler[int]):
    """``--group_by_modality_length``: upstream's grouping, seeded per epoch so a resumed run sees the same order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, replicas: int, seed: int = 0) -> None:
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (positive: image samples, negative: text-only)")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.replicas = replicas
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch_size, self.replicas, generator))


# ---- optimizer ------------------------------------------------------------------------------------------------
def is_projector_parameter(name: str) -> bool:
    return any(key in name for key in PROJECTOR_KEYS)


def is_tower_parameter(name: str) -> bool:
    return "vision_tower" in name


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    projector_lr: float | None,
    tower_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in (decay, no decay) x (projector, tower, main) groups; projector groups get
    ``projector_lr`` and tower groups ``tower_lr`` (None: the main learning rate, no separate group). Each group
    carries its part under ``name`` ("main": LoRA / the LLM at --learning_rate), for the training log."""
    buckets: dict[tuple[bool, str], list[torch.nn.Parameter]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        part = "main"
        if projector_lr is not None and is_projector_parameter(name):
            part = "projector"
        elif tower_lr is not None and is_tower_parameter(name):
            part = "tower"
        buckets.setdefault((name in decay_names, part), []).append(param)
    rates = {"projector": projector_lr, "tower": tower_lr}
    groups = []
    for (decay, part), params in sorted(buckets.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0, "name": part}
        if part in rates:
            group["lr"] = rates[part]
        groups.append(group)
    return groups


# ---- trainer --------------------------------------------------------------------------------------------------
class LLaVATrainer(Trainer):
    """Expects ``args`` to be ``llava.train.train.TrainingArguments`` (group_by_modality_length, mm_projector_lr,
    mm_vision_tower_lr)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._visual_kept = torch.zeros(3, dtype=torch.float64)  # [sum kept, sum before, images] since the last log
        self._step_group_rates: dict[str, float] = {}  # name -> rate, read with the logged learning_rate

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            batch_size=self.args.train_batch_size,
            replicas=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=seed,
        )

    def create_optimizer(self, model=None):
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        tower_lr = getattr(self.args, "mm_vision_tower_lr", None)
        if self.optimizer is not None or (projector_lr is None and tower_lr is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = param_groups(
            opt_model.named_parameters(),
            set(self.get_decay_parameter_names(opt_model)),
            self.args.weight_decay,
            projector_lr,
            tower_lr,
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- stage-1 statistics ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        for sample in getattr(outputs, "token_stats", None) or []:  # the model's output carries them
            if sample["visual_before"] > 0:  # text-only samples carry a dummy image that is dropped
                self._visual_kept += torch.tensor([sample["visual_after"], sample["visual_before"], 1.0])
        return (loss, outputs) if return_outputs else loss

    # ---- learning rates --------------------------------------------------------------------------------------
    def group_learning_rates(self) -> dict[str, float]:
        """The current rate of each named parameter group (see param_groups); empty when the optimizer's groups
        are unnamed (one learning rate for all, or state restored from a checkpoint written without names)."""
        rates: dict[str, float] = {}
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            if "name" in group:
                rates.setdefault(group["name"], float(group["lr"]))
        return rates

    def _get_learning_rate(self) -> float:
        """The Trainer logs the first group's rate, which with --mm_projector_lr is the projector's: log the main
        group's (LoRA) instead. It reads the rate before the scheduler steps; the other groups' rates are kept from
        that same moment for log() to add by name."""
        self._step_group_rates = self.group_learning_rates()
        main = self._step_group_rates.get("main")
        return super()._get_learning_rate() if main is None else main

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "learning_rate" in logs:
            for name, rate in self._step_group_rates.items():
                if name != "main":
                    logs[f"learning_rate_{name}"] = rate
        if "loss" in logs:  # training-step logs happen on every rank at the same step
            totals = self._visual_kept.to(self.args.device)
            if self.args.world_size > 1 and torch.distributed.is_initialized():
                totals = totals.float()
                torch.distributed.all_reduce(totals)
            kept, before, images = totals.tolist()
            if images > 0:
                logs["visual_tokens_kept"] = round(kept / images, 2)
                logs["visual_tokens_before"] = round(before / images, 2)
            self._visual_kept.zero_()
            if torch.cuda.is_available():  # to check a memory estimate against (docs/training.md)
                logs["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        super().log(logs, start_time)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        save_llava_files(self.model, output_dir or self.args.output_dir, self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_non_lora_trainables(self.model if model is None else model, resume_from_checkpoint)
