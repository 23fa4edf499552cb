#!/usr/bin/env bash
# MMBench (dev by default): answers -> the OpenCompass .xlsx, plus local single-pass and circular accuracy when the
# TSV has answers. MMBENCH_LANG=cn runs MMBench-CN; SPLIT picks the TSV; MMBENCH_ALL_ROUNDS=1 asks every rotation of
# the options. Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmbench "$@"
