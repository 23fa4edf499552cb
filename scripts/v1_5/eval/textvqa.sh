#!/usr/bin/env bash
# TextVQA (val, with the OCR-token prompt): answers -> VQA accuracy. Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir textvqa)

run_chunks llava.eval.model_vqa_loader "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$D/train_images" \
  "${RUNNER_ARGS[@]}" "$@"

"$PYTHON" -m eval.textvqa --annotation-file "$D/TextVQA_0.5.1_val.json" \
  --result-file "$D/answers/$CKPT.jsonl" --result-json "$D/results/$CKPT.json"
