#!/usr/bin/env bash
# LoRA fine-tuning of LLaVA-1.5-7B with stage-1 pruning in the loop (paper Table 3), for 4x RTX 4090 (24 GB):
# Vicuna-7B v1.5 + the pretrained 7B projector, llava_v1_5_mix665k, DeepSpeed ZeRO-3, bf16, gradient checkpointing,
# FlashAttention-2 (train_mem.py), LoRA r=128 / alpha=256 on every linear layer of the LLM, projector trained at 2e-5.
#
# Global batch 128 = PER_DEVICE_BATCH x accumulation x NUM_GPUS; the accumulation is derived. For another GPU count
# change NUM_GPUS (and PER_DEVICE_BATCH to fit memory), keep GLOBAL_BATCH=128:
#   NUM_GPUS=8 -> accumulation 4      NUM_GPUS=2 -> 16      NUM_GPUS=1 -> 32      (PER_DEVICE_BATCH=4)
#   NUM_GPUS=8 PER_DEVICE_BATCH=16 on 80 GB cards -> accumulation 1 (upstream's 8x A100 setting)
#
# Memory per 24 GB GPU, ZeRO-3 over 4 GPUs, PER_DEVICE_BATCH=4 (an estimate, not a measurement; see docs/training.md):
#   frozen LLM shard 3.1 GiB + tower shard 0.15 + LoRA/projector training state 1.4 + ZeRO-3 gather buffers ~1
#   + activations up to 5.7 (4 samples of 2048 tokens; ~2 at ~700 tokens) + CUDA context/allocator ~1.5
#   = ~13 GiB worst case (PER_DEVICE_BATCH=8: ~19 GiB). Training logs max_memory_allocated_gb to check it.
#   Out of memory: PER_DEVICE_BATCH=2 (accumulation doubles), or DEEPSPEED_CONFIG=./scripts/zero3_offload.json.
#
# Settings are environment variables (defaults in brackets):
#   MODEL_NAME_OR_PATH [lmsys/vicuna-7b-v1.5]          PRETRAIN_MM_MLP_ADAPTER [./checkpoints/...-pretrain/mm_projector.bin]
#   DATA_PATH [./playground/data/llava_v1_5_mix665k.json]   IMAGE_FOLDER [./playground/data]
#   VISION_TOWER [openai/clip-vit-large-patch14-336]   OUTPUT_DIR [./checkpoints/llava-v1.5-7b-lora-longtail]
#   NUM_GPUS [4]  PER_DEVICE_BATCH [4]  GLOBAL_BATCH [128]  DEEPSPEED_CONFIG [./scripts/zero3.json]
#   PRUNING_ARGS ["--visual-pruning longtail --alpha 0.24 --visual-layer 16"]   REPORT_TO [wandb]  MASTER_PORT [29500]
#   LAUNCHER [deepspeed --num_gpus $NUM_GPUS --master_port $MASTER_PORT]   TRAIN_SCRIPT [llava/train/train_mem.py]
# DEEPSPEED_CONFIG empty or "none": no --deepspeed (plain PyTorch; unset keeps ZeRO-3). One process, no DeepSpeed,
# on one GPU (see docs/training.md for memory) or, with train.py and --use_cpu True --bf16 False --tf32 False, on CPU:
#   NUM_GPUS=1 LAUNCHER=python DEEPSPEED_CONFIG=none bash scripts/v1_5/finetune_lora.sh
# DRY_RUN=1 (or --dry-run as the first argument) prints the batch arithmetic and the command without launching.
# Other arguments are appended to the training flags (a repeated flag takes the last value), e.g. --save_steps 500.
# Rerunning with the same OUTPUT_DIR resumes from its last checkpoint-N.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
DRY_RUN=${DRY_RUN:-0}
MODEL_NAME_OR_PATH=${MODEL_NAME_OR_PATH:-lmsys/vicuna-7b-v1.5}
PRETRAIN_MM_MLP_ADAPTER=${PRETRAIN_MM_MLP_ADAPTER-./checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-lora-longtail}
NUM_GPUS=${NUM_GPUS:-4}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG-./scripts/zero3.json}
PRUNING_ARGS=${PRUNING_ARGS-"--visual-pruning longtail --alpha 0.24 --visual-layer 16"}
REPORT_TO=${REPORT_TO:-wandb}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-deepspeed --num_gpus $NUM_GPUS --master_port $MASTER_PORT}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-llava/train/train_mem.py}

per_step=$((PER_DEVICE_BATCH * NUM_GPUS))
if [ "$per_step" -le 0 ] || [ $((GLOBAL_BATCH % per_step)) -ne 0 ]; then
  echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x NUM_GPUS=$NUM_GPUS" >&2
  exit 2
fi
GRAD_ACCUM=$((GLOBAL_BATCH / per_step))

read -r -a launcher <<< "$LAUNCHER"
read -r -a pruning <<< "$PRUNING_ARGS"
if [ "${#launcher[@]}" -eq 1 ] && [[ "$(basename "${launcher[0]}")" == python* ]] && [ "$NUM_GPUS" -ne 1 ]; then
  echo "error: LAUNCHER=$LAUNCHER starts one process; set NUM_GPUS=1 (the batch arithmetic counts processes)" >&2
  exit 2
fi
cmd=("${launcher[@]}" "$TRAIN_SCRIPT")
if [ -n "$DEEPSPEED_CONFIG" ] && [ "$DEEPSPEED_CONFIG" != "none" ]; then
  cmd+=(--deepspeed "$DEEPSPEED_CONFIG")
fi
cmd+=(--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5
  --model_name_or_path "$MODEL_NAME_OR_PATH"
  --version v1
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION_TOWER")
if [ -n "$PRETRAIN_MM_MLP_ADAPTER" ]; then
  cmd+=(--pretrain_mm_mlp_adapter "$PRETRAIN_MM_MLP_ADAPTER")
fi
cmd+=(--mm_projector_type mlp2x_gelu
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --image_aspect_ratio pad
  --group_by_modality_length True
  --bf16 True
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs 1
  --per_device_train_batch_size "$PER_DEVICE_BATCH"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --eval_strategy no
  --save_strategy steps
  --save_steps 500
  --save_total_limit 2
  --learning_rate 2e-4
  --weight_decay 0.
  --warmup_ratio 0.03
  --lr_scheduler_type cosine
  --logging_steps 1
  --tf32 True
  --model_max_length 2048
  --gradient_checkpointing True
  --dataloader_num_workers 4
  --lazy_preprocess True
  --report_to "$REPORT_TO"
  "${pruning[@]}"
  "$@")

echo "effective global batch: $PER_DEVICE_BATCH per device x $GRAD_ACCUM accumulation x $NUM_GPUS GPUs = $GLOBAL_BATCH"
if [ "$DRY_RUN" = "1" ]; then
  printf 'command:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
