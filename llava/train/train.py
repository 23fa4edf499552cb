"""LoRA (or full) fine-tuning of LLaVA with stage-1 visual pruning in the training forward pass.

    deepspeed llava/train/train_mem.py --deepspeed scripts/zero3.json --lora_enable True \\
        --model_name_or_path lmsys/vicuna-7b-v1.5 --version v1 --data_path llava_v1_5_mix665k.json ... \\
        --visual-pruning longtail --alpha 0.24 --visual-layer 16

Upstream's flags (model / data / training dataclasses) plus the pruning flags every LLaVA entry point takes. The
resolved pruning config is stored in the model config, so every checkpoint evaluates with the setting it was
trained with. Data: ``llava.train.data``; trainer and sampler: ``llava.train.llava_trainer``; checkpoint files:
``llava.train.callbacks``. See docs/training.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import HfArgumentParser, PreTrainedTokenizerBase, enable_full_determinism, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from llava.model.builder import load_tuned_tower
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.tokenization import load_tokenizer
from llava.train.callbacks import PruningLogCallback
from llava.train.data import BAD_SAMPLE_POLICIES, LazySupervisedDataset, SupervisedCollator, training_template
from llava.train.llava_trainer import LLaVATrainer
from pruning import PruningConfig, add_pruning_args, pruning_overrides, resolve_pruning
from pruning.strategies import is_keep_rule

logger = logging.getLogger(__name__)

MULTIMODAL_PARTS = ("mm_projector", "vision_tower", "vision_resampler")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "base LLM (e.g. lmsys/vicuna-7b-v1.5) or a LLaVA checkpoint"})
    version: str = field(default="v1", metadata={"help": "conversation template: v1 (instruction tuning) or plain"})
    freeze_backbone: bool = False
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP folder or hub id (default: checkpoint's)"})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "default: checkpoint's, else -2"})
    mm_vision_select_feature: str | None = field(default=None, metadata={"help": "default: checkpoint's, else patch"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "mm_projector.bin from pretraining"})
    mm_projector_type: str | None = field(default=None, metadata={"help": "default: checkpoint's, else linear"})
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    mm_patch_merge_type: str | None = field(default=None, metadata={"help": "default: checkpoint's, else flat"})
    unfreeze_mm_vision_tower: bool = field(
        default=False, metadata={"help": "train the CLIP tower too (LLaVA-NeXT's flag); saved inside the checkpoint"}
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "conversation JSON (llava_v1_5_mix665k.json format) or JSON lines"})
    image_folder: str | None = None
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (LLaVA-1.5) or square"})
    lazy_preprocess: bool = field(
        default=True,
        metadata={
            "help": "False: keep each record's token ids and image tensor after its first use (later epochs skip "
            "the tokenizer and the image processor; for many epochs over a small set)"
        },
    )
    is_multimodal: bool = field(default=False, metadata={"help": "accepted for upstream scripts; from the model"})
    on_bad_sample: str = field(
        default="error", metadata={"help": "error: stop naming the sample; skip: log its id and use the next one"}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "sequence length after image expansion"})
    remove_unused_columns: bool = False
    freeze_mm_mlp_adapter: bool = False
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the tower with --unfreeze_mm_vision_tower (default: main)"}
    )
    group_by_modality_length: bool = False
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    warmup_ratio: float | None = field(default=None, metadata={"help": "upstream's name: sets --warmup_steps"})
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a float < 1 as a ratio
        super().__post_init__()


def build_parser() -> HfArgumentParser:
    """Upstream's flags (the three dataclasses, --snake_case) plus the pruning flags every entry point takes."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    add_pruning_args(parser)
    return parser


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, training_args, pruning overrides), with the combinations training cannot run refused."""
    parser = build_parser()
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(args=argv)
    if data_args.on_bad_sample not in BAD_SAMPLE_POLICIES:
        parser.error(f"--on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {data_args.on_bad_sample!r}")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        parser.error("--mm_use_im_start_end / --mm_use_im_patch_token are not supported (LLaVA-1.5 trains without)")
    if training_args.lora_bias not in ("none", "all", "lora_only"):
        parser.error(f"--lora_bias must be none, all or lora_only, got {training_args.lora_bias!r}")
    if "wandb" in (training_args.report_to or []) and find_spec("wandb") is None:
        parser.error("--report_to wandb needs wandb: pip install wandb (WANDB_MODE=offline works without network)")
    return model_args, data_args, training_args, pruning_overrides(rest)


def lora_target_pattern(model: nn.Module) -> str:
    """peft regex for every nn.Linear of the language model: not the projector, the vision tower or lm_head."""
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(part in name for part in MULTIMODAL_PARTS)
        }
        - {"lm_head"}
    )
    if not names:
        raise ValueError("the model has no linear layers to put LoRA on")
    excluded = "|".join(MULTIMODAL_PARTS)
    return rf"(?!.*(?:{excluded})).*\.(?:{'|'.join(map(re.escape, names))})"


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def scoring_layer(llava: nn.Module, pruning: PruningConfig) -> nn.Module:
    """The tower layer whose CLS row stage 1 scores; checked at start-up rather than at the first step."""
    clip = llava.get_vision_tower().vision_tower
    layers = getattr(clip, "vision_model", clip).encoder.layers
    if pruning.visual_layer >= len(layers):
        raise ValueError(
            f"--visual-layer {pruning.visual_layer} needs a vision tower with more than {pruning.visual_layer} layers; "
            f"{llava.get_vision_tower().vision_tower_name} has {len(layers)} (valid: 0..{len(layers) - 1})"
        )
    return layers[pruning.visual_layer]


def register_with_zero3(model: nn.Module, layer: nn.Module) -> None:
    """Stage 1 reads the scoring layer's weights directly (only its CLS row is computed), outside that layer's
    forward; under ZeRO-3 they must be declared as used by the model's forward so DeepSpeed gathers them."""
    import deepspeed

    for param in layer.parameters():
        deepspeed.zero.register_external_parameter(model, param)


def init_deepspeed_comm() -> None:
    """ZeRO-3 partitions the weights while they load, through DeepSpeed's communication layer. On GPUs accelerate
    sets that layer up; with --use_cpu it sets up only torch.distributed (gloo), so DeepSpeed would see one rank."""
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()


def tuned_tower_checkpoint(model_name_or_path: str) -> Path | None:
    """The folder when it is a local LLaVA checkpoint that carries a fine-tuned tower (unfreeze_mm_vision_tower: a
    LLaVA-1.6 release or an earlier run of ours with --unfreeze_mm_vision_tower), so training continues from those
    tower weights rather than the CLIP folder's."""
    config_file = Path(model_name_or_path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return Path(model_name_or_path) if config.get("unfreeze_mm_vision_tower") else None


def seed_everything(training_args: TrainingArguments) -> None:
    """The Trainer's own seeding (--seed, --full_determinism), done before the model is built."""
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


# upstream's defaults for a base LLM; a LLaVA checkpoint's own values win when the flag is not given
VISION_ARG_DEFAULTS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "linear",
    "mm_patch_merge_type": "flat",
}


def resolve_vision_args(model_args: ModelArguments, config, source: str) -> None:
    """Fill the unset vision flags from the checkpoint's config (else upstream's defaults). Training starts from the
    checkpoint's projector as it is, so a --mm_projector_type naming another kind is refused: the saved config.json
    would describe a projector the weights do not fit (upstream wrote 'linear' over a LLaVA-1.5 checkpoint's
    mlp2x_gelu when the flag was left out)."""
    existing = getattr(config, "mm_projector_type", None) if getattr(config, "mm_vision_tower", None) else None
    wanted = model_args.mm_projector_type
    if existing and wanted and wanted != existing:
        raise ValueError(
            f"--mm_projector_type {wanted}: {source} has a {existing} projector, which training continues from; "
            f"leave the flag out or pass {existing}"
        )
    for name, default in VISION_ARG_DEFAULTS.items():
        if getattr(model_args, name) is None:
            value = getattr(config, name, None) if getattr(config, "mm_vision_tower", None) else None
            setattr(model_args, name, default if value is None else value)


def build_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    pruning: dict,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, PruningConfig]:
    """(model, tokenizer, pruning config): the LLM, tower + projector, LoRA; tower frozen, projector trainable."""
    # LoRA's A matrices (and a projector built without --pretrain_mm_mlp_adapter) are drawn here, before the Trainer
    # seeds in its __init__: seed first, or two runs with the same --seed start from different weights.
    seed_everything(training_args)
    dtype = compute_dtype(training_args)
    tuned_tower_in = tuned_tower_checkpoint(model_args.model_name_or_path)
    # a tuned tower is built below, not inside from_pretrained (the meta device cannot load the CLIP folder)
    overrides = {"unfreeze_mm_vision_tower": False} if tuned_tower_in is not None else {}
    model = LlavaLlamaForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        attn_implementation=attn_implementation or "sdpa",
        dtype=dtype,
        cache_dir=training_args.cache_dir,
        **overrides,
    )
    model.config.use_cache = False
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, model_max_length=training_args.model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # upstream's choice for Vicuna templates

    resolve_vision_args(model_args, model.config, model_args.model_name_or_path)
    model_args.vision_tower = model_args.vision_tower or getattr(model.config, "mm_vision_tower", None)
    if model_args.vision_tower:
        model.get_model().initialize_vision_modules(model_args)
        tower = model.get_vision_tower()
        if tuned_tower_in is not None:
            load_tuned_tower(tower, tuned_tower_in, tower.dtype)
        if not is_deepspeed_zero3_enabled():
            tower.to(dtype=dtype)
        config = model.config
        config.image_aspect_ratio = data_args.image_aspect_ratio
        config.tokenizer_padding_side = tokenizer.padding_side
        config.tokenizer_model_max_length = tokenizer.model_max_length
        config.mm_projector_lr = training_args.mm_projector_lr
        config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
        config.mm_use_im_start_end = config.mm_use_im_patch_token = False
    config_pruning = resolve_pruning(getattr(model.config, "pruning", None), pruning)
    model.set_pruning(config_pruning)

    if model_args.freeze_backbone:
        model.get_model().requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    llava = model
    if training_args.lora_enable:
        lora = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            target_modules=lora_target_pattern(model),
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if model_args.vision_tower:
        llava.get_model().mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
        llava.get_vision_tower().requires_grad_(model_args.unfreeze_mm_vision_tower)
        # a tower tuned now or before (the base's) is not the CLIP folder's: the checkpoints must carry it
        llava.config.unfreeze_mm_vision_tower = model_args.unfreeze_mm_vision_tower or tuned_tower_in is not None
        if is_keep_rule(config_pruning.visual_pruning):  # pruning off runs the plain tower: no layer is scored
            layer = scoring_layer(llava, config_pruning)
            if is_deepspeed_zero3_enabled():
                register_with_zero3(model, layer)
    return model, tokenizer, config_pruning


def build_dataset(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
) -> tuple[LazySupervisedDataset, SupervisedCollator]:
    """The lazy dataset and a collator whose dummy images match the tower's crop (for text-only samples)."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = llava.get_vision_tower()
    processor = tower.image_processor if tower is not None else None
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        training_template(model_args.version),
        image_folder=data_args.image_folder,
        image_processor=processor,
        image_aspect_ratio=data_args.image_aspect_ratio,
        max_length=training_args.model_max_length,
        on_bad_sample=data_args.on_bad_sample,
        keep_loaded=not data_args.lazy_preprocess,
    )
    image_shape = None
    if processor is not None:
        crop = processor.crop_size
        image_shape = (3, int(crop["height"]), int(crop["width"]))
    collator = SupervisedCollator(tokenizer.pad_token_id, training_args.model_max_length, image_shape)
    return dataset, collator


def train(attn_implementation: str | None = None, argv: list[str] | None = None) -> LLaVATrainer:
    """Parse the flags, build, train (continuing from the output folder's last checkpoint), save; returns the
    trainer so callers (tests, notebooks) can inspect its state."""
    model_args, data_args, training_args, pruning = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    logger.info("process %d of %d on %s", training_args.process_index, training_args.world_size, training_args.device)
    if training_args.deepspeed and training_args.world_size > 1:
        init_deepspeed_comm()
    model, tokenizer, pruning_config = build_model(model_args, data_args, training_args, pruning, attn_implementation)
    dataset, collator = build_dataset(model, tokenizer, model_args, data_args, training_args)
    trainer = LLaVATrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[PruningLogCallback(pruning_config.to_dict(), pruning_config.describe())],
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    if resume is None and Path(training_args.output_dir).is_dir() and get_last_checkpoint(training_args.output_dir):
        resume = True  # upstream's habit: rerunning the script continues the run
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    return trainer


def shut_down_distributed() -> bool:
    """Leave the process group together (True when this process was in one): a rank exiting while another still
    talks over gloo / DeepSpeed's shared memory can abort at interpreter teardown."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


_RUN = {"left_the_group": False}


def end_process_after_clean_shutdown() -> None:
    """Exit handler of a run whose ranks all saved and left the process group: end the process here, after the
    handlers registered later (wandb's among them) and before the interpreter's teardown. That teardown runs the C++
    destructors of the distributed libraries, and in CPU runs under load one of them can abort ("terminate called
    without an active exception", seen with DeepSpeed ZeRO-3 on gloo), which torchrun reports as a failed run
    although everything was written. A run that failed keeps its exit status."""
    if _RUN["left_the_group"]:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_training(attn_implementation: str | None = None, argv: list[str] | None = None) -> None:
    """The scripts' entry: ``train``, then leave the process group and end the process cleanly."""
    atexit.register(end_process_after_clean_shutdown)  # registered first, so it runs last
    train(attn_implementation, argv)
    _RUN["left_the_group"] = shut_down_distributed()


def main() -> None:
    run_training(argv=sys.argv[1:])


if __name__ == "__main__":
    main()
