#!/usr/bin/env bash
# VQAv2 (EvalAI submission, or local val scores with VQAV2_ANNOTATIONS) on LLaVA-1.6: scripts/v1_5/eval/vqav2.sh with the LLaVA-1.6 defaults (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" vqav2 "$@"
