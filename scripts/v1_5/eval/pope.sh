#!/usr/bin/env bash
# POPE: answers -> mean F1 over adversarial / popular / random. Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir pope)

run_chunks llava.eval.model_vqa_loader "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/llava_pope_test.jsonl" --image-folder "$D/val2014" "${RUNNER_ARGS[@]}" "$@"

"$PYTHON" -m eval.pope --annotation-dir "$D/coco" --question-file "$D/llava_pope_test.jsonl" \
  --result-file "$D/answers/$CKPT.jsonl" --result-json "$D/results/$CKPT.json"
