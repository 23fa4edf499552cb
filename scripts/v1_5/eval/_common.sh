#!/usr/bin/env bash
# Shared by the scripts in this folder (source it, do not run it). Every setting is an environment variable:
#
#   MODEL_PATH    checkpoint folder or hub id                  (default liuhaotian/llava-v1.5-7b)
#   MODEL_BASE    base LLM for LoRA / projector-only folders   (default none)
#   CKPT          run name: answers/$CKPT.jsonl, results/$CKPT.json   (default: the last part of MODEL_PATH)
#   PRUNING_ARGS  pruning flags, e.g. "--visual-pruning longtail --kv-pruning h2o"   (default: the checkpoint's)
#   CONV_MODE     conversation template        (default: the runner's, i.e. what upstream evaluated the checkpoint's
#                 family with: vicuna_v1 for LLaVA-1.5 / 1.6-Vicuna, mistral_instruct, chatml_direct for 34B)
#   BATCH_SIZE    questions per generate call                  (default 1, as upstream)
#   EVAL_DIR      benchmark data root                          (default ./playground/data/eval)
#   DATA_DIR      this benchmark's folder                      (default $EVAL_DIR/<bench>, e.g. a mini copy)
#   PYTHON        interpreter                                  (default python, else python3)
#   CUDA_VISIBLE_DEVICES  one chunk per listed GPU; unset or empty: one chunk (CPU or the default GPU)
#
# Arguments given to a script are passed on to the runner, after the defaults, e.g.
#   CKPT=llava-v1.5-7b-longtail bash scripts/v1_5/eval/pope.sh --visual-pruning longtail --batch-size 8

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-7b}
MODEL_BASE=${MODEL_BASE:-}
CKPT=${CKPT:-$(basename "${MODEL_PATH%/}")}
PRUNING_ARGS=${PRUNING_ARGS:-}
CONV_MODE=${CONV_MODE:-}
BATCH_SIZE=${BATCH_SIZE:-1}
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}

# Flags every runner gets: the model, greedy decoding, the pruning settings.
RUNNER_ARGS=(--model-path "$MODEL_PATH" --temperature 0 --batch-size "$BATCH_SIZE")
if [ -n "$CONV_MODE" ]; then
  RUNNER_ARGS+=(--conv-mode "$CONV_MODE")
fi
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
# CHUNK_DIR/${CHUNKS}_${IDX}.jsonl (+ its run record .run.json); then the chunks are concatenated in index order
# into MERGED_FILE (llava.eval.merge_chunks, which checks that their settings agree), which is therefore the answers
# of a single run. A rerun resumes every chunk where it stopped; a runner that stops on bad input or on settings
# that differ from its answers file (exit status 2) is not resumable by a rerun.
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
  local failed=0 status
  for idx in "${!pids[@]}"; do
    status=0
    wait "${pids[$idx]}" || status=$?
    if [ "$status" -eq 2 ]; then
      echo "error: chunk $idx of $chunks ($module) stopped on its input or settings (message above); fix that first" >&2
      failed=1
    elif [ "$status" -ne 0 ]; then
      echo "error: chunk $idx of $chunks ($module) failed (exit status $status); rerun the script to resume" >&2
      failed=1
    fi
  done
  trap - INT TERM
  if [ "$failed" -ne 0 ]; then
    return 1
  fi
  local files=()
  for ((idx = 0; idx < chunks; idx++)); do
    files+=("$chunk_dir/${chunks}_${idx}.jsonl")
  done
  "$PYTHON" -m llava.eval.merge_chunks --out "$merged" "${files[@]}"
}
