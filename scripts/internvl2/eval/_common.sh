#!/usr/bin/env bash
# InternVL2-1B on the eight benchmarks: `bash _common.sh <benchmark> [runner flags ...]` runs
# scripts/v1_5/eval/_common.sh (the same driver, runners, scorers and answers/results layout), so every setting
# documented there applies. What differs:
#
#   MODEL_PATH  default OpenGVLab/InternVL2-1B (the release folder, loaded without remote code: docs/models.md)
#   template    Hermes-2, the one its config.json names (CONV_MODE overrides, as everywhere)
#   wording     each script passes the --prompt-style of InternVL's own evaluation script for that benchmark and its
#               max_new_tokens (llava/eval/prompt_styles.py; OpenGVLab/InternVL 2410d1db, internvl_chat/eval)
#
# Stage 1 runs on every tile (grid tiles and thumbnail) on 2x2-merged tokens (docs/method.md, "Merged tokens
# (InternVL2)"); PRUNING_ARGS="... --crop-budget global" pools each image's budget over its tiles. Example:
#   CKPT=internvl2-1b-longtail-h2o PRUNING_ARGS="--visual-pruning longtail --kv-pruning h2o" \
#     bash scripts/internvl2/eval/pope.sh
set -euo pipefail
V15_COMMON="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval" && pwd)/_common.sh"
export MODEL_PATH=${MODEL_PATH:-OpenGVLab/InternVL2-1B}
if [ ! -f "$V15_COMMON" ]; then
  echo "error: $V15_COMMON not found (the InternVL2 scripts run the v1_5 one)" >&2
  exit 1
fi
echo "InternVL2: MODEL_PATH=$MODEL_PATH${CONV_MODE:+ CONV_MODE=$CONV_MODE}" >&2
exec bash "$V15_COMMON" "$@"
