#!/usr/bin/env bash
# VQAv2: answers for SPLIT (default test-dev) -> the EvalAI submission file (scored on the EvalAI server).
# With VQAV2_ANNOTATIONS=<v2_mscoco_val2014_annotations.json> (and optionally VQAV2_QUESTIONS=<the official
# v2_OpenEnded_mscoco_val2014_questions.json>) it scores a val split locally instead. Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir vqav2)
SPLIT=${SPLIT:-llava_vqav2_mscoco_test-dev2015}
IMAGES=${VQAV2_IMAGES:-$D/test2015}
ANSWERS="$D/answers/$SPLIT/$CKPT"

run_chunks llava.eval.model_vqa_loader "$ANSWERS" "$ANSWERS/merge.jsonl" \
  --question-file "$D/$SPLIT.jsonl" --image-folder "$IMAGES" "${RUNNER_ARGS[@]}" "$@"

if [ -n "${VQAV2_ANNOTATIONS:-}" ]; then
  questions=()
  if [ -n "${VQAV2_QUESTIONS:-}" ]; then
    questions=(--question-json "$VQAV2_QUESTIONS")
  fi
  "$PYTHON" -m eval.vqav2 --result-file "$ANSWERS/merge.jsonl" --annotation-file "$VQAV2_ANNOTATIONS" \
    "${questions[@]}" --result-json "$D/results/$CKPT.json"
else
  "$PYTHON" -m eval.vqav2 --result-file "$ANSWERS/merge.jsonl" --test-file "$D/llava_vqav2_mscoco_test2015.jsonl" \
    --question-file "$D/$SPLIT.jsonl" --out "$D/answers_upload/$SPLIT/$CKPT.json" \
    --result-json "$D/results/$CKPT.json"
fi
