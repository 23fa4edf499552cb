#!/usr/bin/env bash
# MMBench (OpenCompass xlsx + local accuracy) on LLaVA-1.6: scripts/v1_5/eval/mmbench.sh with the LLaVA-1.6 defaults (see _common.sh here).
set -euo pipefail
# shellcheck source=scripts/v1_6/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_v15 mmbench.sh "$@"
