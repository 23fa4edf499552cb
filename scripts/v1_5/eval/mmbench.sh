#!/usr/bin/env bash
# MMBench (dev by default): answers -> the OpenCompass .xlsx, plus local single-pass and circular accuracy when the
# TSV has answers. MMBENCH_LANG=cn runs MMBench-CN (folder mmbench_cn, Chinese instruction); SPLIT picks the TSV;
# MMBENCH_ALL_ROUNDS=1 asks every rotation of the options. Settings: see _common.sh.
set -euo pipefail
# shellcheck source=scripts/v1_5/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
MMBENCH_LANG=${MMBENCH_LANG:-en}
case "$MMBENCH_LANG" in
  en) D=$(bench_dir mmbench); SPLIT=${SPLIT:-mmbench_dev_20230712} ;;
  cn) D=$(bench_dir mmbench_cn); SPLIT=${SPLIT:-mmbench_dev_cn_20231003} ;;
  *) echo "error: MMBENCH_LANG must be en or cn, got '$MMBENCH_LANG'" >&2; exit 2 ;;
esac
rounds=()
if [ "${MMBENCH_ALL_ROUNDS:-0}" = 1 ]; then
  rounds=(--all-rounds)
fi

run_chunks llava.eval.model_vqa_mmbench "$D/answers/$SPLIT/$CKPT" "$D/answers/$SPLIT/$CKPT.jsonl" \
  --question-file "$D/$SPLIT.tsv" --single-pred-prompt --lang "$MMBENCH_LANG" "${rounds[@]}" \
  "${RUNNER_ARGS[@]}" "$@"

"$PYTHON" -m eval.mmbench --annotation-file "$D/$SPLIT.tsv" --result-file "$D/answers/$SPLIT/$CKPT.jsonl" \
  --upload-dir "$D/answers_upload/$SPLIT" --experiment "$CKPT" --lang "$MMBENCH_LANG" \
  --result-json "$D/results/$CKPT.json"
