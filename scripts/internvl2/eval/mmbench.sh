#!/usr/bin/env bash
# MMBench on InternVL2-1B: LLaVA's layout is InternVL's (mmbench/evaluate_mmbench.py), 100 new tokens; MMBENCH_LANG=cn runs MMBench-CN (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench --max_new_tokens 100 "$@"
