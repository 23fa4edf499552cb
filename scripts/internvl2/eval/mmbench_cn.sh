#!/usr/bin/env bash
# MMBench-CN on InternVL2-1B: as mmbench.sh with the Chinese instruction, 100 new tokens (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench_cn --max_new_tokens 100 "$@"
