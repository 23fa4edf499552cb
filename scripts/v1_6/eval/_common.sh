#!/usr/bin/env bash
# The LLaVA-1.6 defaults of the scripts in this folder: `bash _common.sh <benchmark> [runner flags ...]` runs
# scripts/v1_5/eval/_common.sh (the same driver, runners, scorers and answers/results layout), so every setting
# documented there applies; only the default MODEL_PATH differs:
#
#   MODEL_PATH  default liuhaotian/llava-v1.6-mistral-7b (the checkpoint behind the paper's LLaVA-1.6 rows)
#   (CONV_MODE keeps the runner's default, one rule in llava/utils.py:default_conv_mode, as LLaVA-NeXT evaluated
#   them: mistral_instruct for llava_mistral checkpoints or names with "mistral", chatml_direct for names with
#   "34b", vicuna_v1 otherwise; set CONV_MODE to override)
#
# Stage 1 runs on every crop (base image + grid crops); PRUNING_ARGS="... --crop-budget global" pools the budget
# over the crops of each image instead (docs/llava16.md). Example:
#   CKPT=llava-v1.6-mistral-7b-longtail-h2o PRUNING_ARGS="--visual-pruning longtail --kv-pruning h2o" \
#     bash scripts/v1_6/eval/pope.sh
set -euo pipefail
V15_COMMON="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval" && pwd)/_common.sh"
export MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.6-mistral-7b}
if [ ! -f "$V15_COMMON" ]; then
  echo "error: $V15_COMMON not found (the LLaVA-1.6 scripts run the v1_5 one)" >&2
  exit 1
fi
echo "LLaVA-1.6: MODEL_PATH=$MODEL_PATH${CONV_MODE:+ CONV_MODE=$CONV_MODE}" >&2
exec bash "$V15_COMMON" "$@"
