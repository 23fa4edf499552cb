#!/usr/bin/env bash
# MMBench-CN (upstream's script name): mmbench.sh in Chinese, folder mmbench_cn. Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench_cn "$@"
