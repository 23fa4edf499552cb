#!/usr/bin/env bash
# LLaVA-1.6 defaults for the scripts in this folder (source it, do not run it). Each script here runs the same
# benchmark script of scripts/v1_5/eval (same runners, same scorers, same answers/results layout), so every
# setting of scripts/v1_5/eval/_common.sh applies; only the default MODEL_PATH differs:
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

V15_EVAL="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval" && pwd)"
export MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.6-mistral-7b}

# run_v15 SCRIPT ARGS...: the v1_5 script of the same benchmark, with these defaults in its environment.
run_v15() {
  local script="$V15_EVAL/$1"
  shift
  if [ ! -f "$script" ]; then
    echo "error: $script not found (the LLaVA-1.6 scripts reuse the v1_5 benchmark scripts)" >&2
    return 1
  fi
  echo "LLaVA-1.6: MODEL_PATH=$MODEL_PATH${CONV_MODE:+ CONV_MODE=$CONV_MODE}" >&2
  exec bash "$script" "$@"
}
