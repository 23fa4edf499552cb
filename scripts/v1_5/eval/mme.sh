#!/usr/bin/env bash
# MME: answers -> perception (headline) and cognition scores; also writes the official eval_tool's input files.
# Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
D=$(bench_dir MME)

run_chunks llava.eval.model_vqa_loader "$D/answers/$CKPT" "$D/answers/$CKPT.jsonl" \
  --question-file "$D/llava_mme.jsonl" --image-folder "$D/MME_Benchmark_release_version" \
  "${RUNNER_ARGS[@]}" "$@"

"$PYTHON" -m eval.mme --mme-dir "$D/MME_Benchmark_release_version" --result-file "$D/answers/$CKPT.jsonl" \
  --write-mme-txt "$D/eval_tool/answers/$CKPT" --result-json "$D/results/$CKPT.json"
