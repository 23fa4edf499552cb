#!/usr/bin/env bash
# POPE (mean F1) on InternVL2-1B: LLaVA's question lines as InternVL's evaluate_pope.py uses them, 100 new tokens (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" pope --max_new_tokens 100 "$@"
