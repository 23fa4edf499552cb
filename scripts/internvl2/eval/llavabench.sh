#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild on InternVL2-1B: question + ' Please give a detailed answer.', 1000 new tokens (InternVL's llava_bench/evaluate_llava_bench.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" llavabench --prompt-style internvl2_llavabench --max_new_tokens 1000 "$@"
