#!/usr/bin/env bash
# Shared by the scripts in this folder (source it, do not run it). Every setting is an environment variable:
#
#   MODEL_PATH    checkpoint folder or hub id                  (default liuhaotian/llava-v1.5-7b)
#   MODEL_BASE    base LLM for LoRA / projector-only folders   (default none)
#   CKPT          run name: answers/$CKPT.jsonl, results/$CKPT.json   (default: the last part of MODEL_PATH)
#   PRUNING_ARGS  pruning flags, e.g. "--visual-pruning longtail --kv-pruning h2o"   (default: the checkpoint's)
#   CONV_MODE     conversation template                        (default vicuna_v1)
#   BATCH_SIZE    questions per generate call                  (default 1, as upstream)
#   EVAL_DIR      benchmark data root                          (default ./playground/data/eval)
#   DATA_DIR      this benchmark's folder                      (default $EVAL_DIR/<bench>, e.g. a mini copy)
#   PYTHON        interpreter                                  (default python)
#   CUDA_VISIBLE_DEVICES  one chunk per listed GPU; unset or empty: one chunk (CPU or the default GPU)
#
# Arguments given to a script are passed on to the runner, after the defaults, e.g.
#   CKPT=llava-v1.5-7b-longtail bash scripts/v1_5/eval/pope.sh --visual-pruning longtail --batch-size 8

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-7b}
MODEL_BASE=${MODEL_BASE:-}
CKPT=${CKPT:-$(basename "${MODEL_PATH%/}")}
PRUNING_ARGS=${PRUNING_ARGS:-}
CONV_MODE=${CONV_MODE:-vicuna_v1}
BATCH_SIZE=${BATCH_SIZE:-1}
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
PYTHON=${PYTHON:-python}

# Flags every runner gets: the model, greedy decoding, the pruning settings.
RUNNER_ARGS=(--model-path "$MODEL_PATH" --conv-mode "$CONV_MODE" --temperature 0 --batch-size "$BATCH_SIZE")
if [ -n "$MODEL_BASE" ]; then
  RUNNER_ARGS+=(--model-base "$MODEL_BASE")
fi
read -r -a _pruning <<< "$PRUNING_ARGS"
RUNNER_ARGS+=("${_pruning[@]}")

# bench_dir NAME: the benchmark's data folder ($DATA_DIR if set), which must exist.
bench_dir() {
  local dir=${DATA_DIR:-$EVAL_DIR/$1}
  if [ ! -d "$dir" ]; then
    echo "error: no data folder $dir for $1; see playground/data/eval/README.md (or set EVAL_DIR / DATA_DIR)" >&2
    return 1
  fi
  printf '%s\n' "$dir"
}

# run_chunks MODULE CHUNK_DIR MERGED_FILE RUNNER_FLAGS...
# One runner per GPU in CUDA_VISIBLE_DEVICES (one in all when unset), each on its slice of the questions, writing
# CHUNK_DIR/${CHUNKS}_${IDX}.jsonl; then the chunks are concatenated in index order into MERGED_FILE, which is
# therefore the answers of a single run. A rerun resumes every chunk where it stopped.
run_chunks() {
  local module=$1 chunk_dir=$2 merged=$3
  shift 3
  local gpus=()
  IFS=',' read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
  local chunks=${#gpus[@]}
  if [ "$chunks" -eq 0 ]; then
    chunks=1
  fi
  mkdir -p "$chunk_dir" "$(dirname "$merged")"
  local pids=() idx
  for ((idx = 0; idx < chunks; idx++)); do
    (
      if [ ${#gpus[@]} -gt 0 ]; then
        export CUDA_VISIBLE_DEVICES=${gpus[$idx]}
      fi
      exec "$PYTHON" -m "$module" "$@" \
        --answers-file "$chunk_dir/${chunks}_${idx}.jsonl" --num-chunks "$chunks" --chunk-idx "$idx"
    ) &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
  local failed=0
  for idx in "${!pids[@]}"; do
    if ! wait "${pids[$idx]}"; then
      echo "error: chunk $idx of $chunks ($module) failed; rerun the script to resume" >&2
      failed=1
    fi
  done
  trap - INT TERM
  if [ "$failed" -ne 0 ]; then
    return 1
  fi
  local tmp="$merged.tmp"
  : > "$tmp"
  for ((idx = 0; idx < chunks; idx++)); do
    cat "$chunk_dir/${chunks}_${idx}.jsonl" >> "$tmp"
  done
  mv "$tmp" "$merged"
  echo "answers: $merged ($(wc -l < "$merged") lines from $chunks chunk(s))" >&2
}
