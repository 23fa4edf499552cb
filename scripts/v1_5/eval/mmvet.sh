#!/usr/bin/env bash
# MM-Vet: answers -> MM-Vet's grader input (answers_upload/$CKPT.json), then the GPT grade when a judge is
# configured (JUDGE_MODEL, OPENAI_API_KEY, optionally OPENAI_BASE_URL; see docs/evaluation.md). Settings: _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir mm-vet)

run_chunks llava.eval.model_vqa "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/llava-mm-vet.jsonl" --image-folder "$D/images" "${RUNNER_ARGS[@]}" "$@"

grade=()
if [ -n "${JUDGE_MODEL:-}" ]; then
  grade=(--grade --mmvet-json "$D/mm-vet.json" --result-json "$D/results/$CKPT.json")
else
  echo "JUDGE_MODEL is not set: writing the grader input only (no score)" >&2
fi
"$PYTHON" -m eval.mmvet --question-file "$D/llava-mm-vet.jsonl" --result-file "$D/answers/$CKPT.jsonl" \
  --out-json "$D/answers_upload/$CKPT.json" "${grade[@]}"
