#!/usr/bin/env bash
# Phi-3-vision on the eight benchmarks: `bash _common.sh <benchmark> [runner flags ...]` runs
# scripts/v1_5/eval/_common.sh (the same driver, runners, scorers and answers/results layout), so every setting
# documented there applies. What differs:
#
#   MODEL_PATH  default microsoft/Phi-3-vision-128k-instruct (the release folder, loaded without remote code:
#               docs/models.md)
#   template    phi3_v, the release's chat template: <|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n
#               (chosen from the checkpoint's config; CONV_MODE overrides, as everywhere)
#   wording     LLaVA's question files as they are. Microsoft published no evaluation code for Phi-3-vision; the
#               public harnesses that run it (lmms-eval's phi3v, VLMEvalKit's Phi3Vision) put the benchmark's own
#               prompt after <|image_1|>\n in this template, and lmms-eval's prompts are LLaVA's short-answer and
#               letter instructions (docs/models.md, "Evaluation")
#
# Stage 1 runs on every crop (the HD crops and the global view) on 2x2-merged tokens (docs/method.md, "Merged tokens
# (Phi-3-vision)"); PRUNING_ARGS="... --crop-budget global" pools each image's budget over its crops. Example:
#   CKPT=Phi-3-vision-128k-instruct-longtail-h2o PRUNING_ARGS="--visual-pruning longtail --kv-pruning h2o" \
#     bash scripts/phi3v/eval/pope.sh
set -euo pipefail
V15_COMMON="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval" && pwd)/_common.sh"
export MODEL_PATH=${MODEL_PATH:-microsoft/Phi-3-vision-128k-instruct}
if [ ! -f "$V15_COMMON" ]; then
  echo "error: $V15_COMMON not found (the Phi-3-vision scripts run the v1_5 one)" >&2
  exit 1
fi
echo "Phi-3-vision: MODEL_PATH=$MODEL_PATH${CONV_MODE:+ CONV_MODE=$CONV_MODE}" >&2
exec bash "$V15_COMMON" "$@"
