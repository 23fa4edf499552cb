#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild (GPT-reviewed when JUDGE_MODEL is set) on LLaVA-1.6: scripts/v1_5/eval/llavabench.sh with the LLaVA-1.6 defaults (see _common.sh here).
set -euo pipefail
# shellcheck source=scripts/v1_6/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_v15 llavabench.sh "$@"
