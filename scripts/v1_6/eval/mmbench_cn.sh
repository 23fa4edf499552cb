#!/usr/bin/env bash
# MMBench-CN on LLaVA-1.6: scripts/v1_5/eval/mmbench_cn.sh with the LLaVA-1.6 defaults (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench_cn "$@"
