#!/usr/bin/env bash
# MMBench-CN: mmbench.sh with MMBENCH_LANG=cn (upstream's script name).
MMBENCH_LANG=cn exec bash "$(dirname "${BASH_SOURCE[0]}")/mmbench.sh" "$@"
