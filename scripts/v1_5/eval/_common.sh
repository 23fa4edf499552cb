#!/usr/bin/env bash
# The one script behind every benchmark script in this folder: `bash _common.sh <benchmark> [runner flags ...]`
# (pope.sh is `exec bash _common.sh pope "$@"`). What a benchmark runs (question file and image folder, runner and
# its flags, scorer and its call, answers layout) is its spec in eval/benchmarks.py (`python -m eval.benchmarks`
# lists them); `python -m llava.eval.run_benchmark` runs it. Every setting is an environment variable:
#
#   MODEL_PATH    checkpoint folder or hub id                  (default liuhaotian/llava-v1.5-7b)
#   MODEL_BASE    base LLM for LoRA / projector-only folders   (default none)
#   CKPT          run name: answers/$CKPT.jsonl, results/$CKPT.json   (default: the last part of MODEL_PATH)
#   PRUNING_ARGS  pruning flags, e.g. "--visual-pruning longtail --kv-pruning h2o"   (default: the checkpoint's)
#   CONV_MODE     conversation template, passed only when set   (default: the runner's, i.e. what upstream evaluated
#                 the checkpoint's family with: vicuna_v1 for LLaVA-1.5 / 1.6-Vicuna, mistral_instruct, chatml_direct
#                 for 34B)
#   BATCH_SIZE    questions per generate call                  (default 1, as upstream)
#   EVAL_DIR      benchmark data root                          (default ./playground/data/eval)
#   DATA_DIR      this benchmark's folder                      (default $EVAL_DIR/<folder>, e.g. a mini copy)
#   PYTHON        interpreter                                  (default python, else python3)
#   CUDA_VISIBLE_DEVICES  one chunk per listed GPU; unset or empty: one chunk (CPU or the default GPU)
#
# Settings of some benchmarks:
#   SPLIT               vqav2: questions $SPLIT.jsonl (default llava_vqav2_mscoco_test-dev2015); mmbench, mmbench_cn:
#                       the TSV $SPLIT.tsv (default mmbench_dev_20230712, mmbench_dev_cn_20231003)
#   JUDGE_MODEL         mmvet, llavabench: the GPT judge (with OPENAI_API_KEY, optionally OPENAI_BASE_URL; see
#                       docs/evaluation.md); unset: answers only (and MM-Vet's grader input), no score
#   MMBENCH_LANG        mmbench.sh: cn runs MMBench-CN (folder mmbench_cn, Chinese instruction), as mmbench_cn.sh
#   MMBENCH_ALL_ROUNDS  mmbench, mmbench_cn: 1 asks every rotation of the options (circular evaluation)
#   VQAV2_IMAGES        vqav2: the image folder (default $DATA_DIR/test2015)
#   VQAV2_ANNOTATIONS   vqav2: v2_mscoco_val2014_annotations.json scores a val split locally instead of writing the
#   VQAV2_QUESTIONS     EvalAI submission file, optionally with the official v2_OpenEnded_mscoco_val2014_questions.json
#   BENCHMARK_MODULES   Python modules (comma-separated) that register more benchmarks (docs/architecture.md)
#
# One runner per GPU in CUDA_VISIBLE_DEVICES, each on its slice of the questions, writing
# answers/$CKPT/<chunks>_<idx>.jsonl (+ its run record .run.json); the chunks are then concatenated in index order
# into answers/$CKPT.jsonl (llava.eval.merge_chunks, which checks that their settings agree), which is therefore the
# answers of a single run, and the scorer writes results/$CKPT.json. A rerun resumes every chunk where it stopped; a
# runner that stops on bad input or on settings that differ from its answers file (exit status 2) is not resumable
# by a rerun: the script says "fix that first" instead of "rerun the script to resume".
#
# Arguments given to a script are passed on to the runner, after the defaults, e.g.
#   CKPT=llava-v1.5-7b-longtail bash scripts/v1_5/eval/pope.sh --visual-pruning longtail --batch-size 8
set -euo pipefail
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
export PYTHON
exec "$PYTHON" -m llava.eval.run_benchmark "$@"
