#!/usr/bin/env bash
# MMBench (dev; MMBENCH_LANG=cn runs MMBench-CN) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench "$@"
