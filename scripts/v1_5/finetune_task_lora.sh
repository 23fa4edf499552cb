#!/usr/bin/env bash
# LoRA on your own data starting from the released LLaVA-1.5-7B (upstream's finetune_task_lora.sh): the projector and
# tower come with the checkpoint, so there is no pretrained adapter to load. Same recipe, batch arithmetic, memory
# notes and settings as finetune_lora.sh, with these defaults changed:
#   MODEL_NAME_OR_PATH [liuhaotian/llava-v1.5-7b]   PRETRAIN_MM_MLP_ADAPTER [none]
#   DATA_PATH [./playground/data/llava_task.json]   OUTPUT_DIR [./checkpoints/llava-v1.5-7b-task-lora-longtail]
# A base whose tower was tuned (config unfreeze_mm_vision_tower: true, e.g. the demo checkpoint) trains on that tower,
# and every checkpoint carries it in non_lora_trainables.bin (docs/training.md, section 7).
# DRY_RUN=1 or --dry-run prints the command without launching.
set -euo pipefail
export MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-liuhaotian/llava-v1.5-7b}
export PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER:-}
export DATA_PATH=${DATA_PATH:-./playground/data/llava_task.json}
export OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-task-lora-longtail}
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_lora.sh" "$@"
