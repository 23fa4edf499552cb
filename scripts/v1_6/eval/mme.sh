#!/usr/bin/env bash
# MME (perception score) on LLaVA-1.6: scripts/v1_5/eval/mme.sh with the LLaVA-1.6 defaults (see _common.sh here).
set -euo pipefail
# shellcheck source=scripts/v1_6/eval/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_v15 mme.sh "$@"
