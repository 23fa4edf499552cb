#!/usr/bin/env bash
# MM-Vet (GPT-graded when JUDGE_MODEL is set) on LLaVA-1.6: scripts/v1_5/eval/mmvet.sh with the LLaVA-1.6 defaults (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmvet "$@"
