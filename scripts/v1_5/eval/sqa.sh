#!/usr/bin/env bash
# ScienceQA: answers -> IMG accuracy (and total, and the official breakdown). Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir scienceqa)

run_chunks llava.eval.model_vqa_science "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/llava_test_CQM-A.json" --image-folder "$D/images/test" --single-pred-prompt \
  "${RUNNER_ARGS[@]}" "$@"

"$PYTHON" -m eval.sqa --base-dir "$D" --result-file "$D/answers/$CKPT.jsonl" \
  --output-file "$D/answers/${CKPT}_output.jsonl" --output-result "$D/answers/${CKPT}_result.json" \
  --result-json "$D/results/$CKPT.json"
