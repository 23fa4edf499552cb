#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild: answers -> GPT review against GPT-4's answers -> relative score, when a judge is
# configured (JUDGE_MODEL, OPENAI_API_KEY, optionally OPENAI_BASE_URL; see docs/evaluation.md). Settings: _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir llava-bench-in-the-wild)

run_chunks llava.eval.model_vqa "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/questions.jsonl" --image-folder "$D/images" "${RUNNER_ARGS[@]}" "$@"

if [ -z "${JUDGE_MODEL:-}" ]; then
  echo "JUDGE_MODEL is not set: answers written, review skipped" >&2
  exit 0
fi
mkdir -p "$D/reviews"
"$PYTHON" -m eval.llavabench --question "$D/questions.jsonl" --context "$D/context.jsonl" \
  --answer-list "$D/answers_gpt4.jsonl" "$D/answers/$CKPT.jsonl" \
  --output "$D/reviews/$CKPT.jsonl" --result-json "$D/results/$CKPT.json"
