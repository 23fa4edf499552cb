#!/usr/bin/env bash
# TextVQA (VQA accuracy) on LLaVA-1.6: scripts/v1_5/eval/textvqa.sh with the LLaVA-1.6 defaults (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" textvqa "$@"
