#!/usr/bin/env bash
# POPE (mean F1) on LLaVA-1.6: scripts/v1_5/eval/pope.sh with the LLaVA-1.6 defaults (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" pope "$@"
