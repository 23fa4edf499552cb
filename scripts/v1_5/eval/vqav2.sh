#!/usr/bin/env bash
# VQAv2: answers for SPLIT (default test-dev) -> the EvalAI submission file (scored on the EvalAI server), or with
# VQAV2_ANNOTATIONS (and optionally VQAV2_QUESTIONS) local scores of a val split. Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" vqav2 "$@"
