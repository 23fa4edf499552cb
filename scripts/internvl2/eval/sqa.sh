#!/usr/bin/env bash
# ScienceQA on InternVL2-1B: hint, question, options, letter instruction, 100 new tokens (InternVL's scienceqa/evaluate_scienceqa.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" sqa --prompt-style internvl2_sqa --max_new_tokens 100 "$@"
