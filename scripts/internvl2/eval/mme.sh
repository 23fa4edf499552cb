#!/usr/bin/env bash
# MME on InternVL2-1B: the question with 'Please answer yes or no.' + ' ' + instruction, 20 new tokens (InternVL's mme/eval.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mme --prompt-style internvl2_mme --max_new_tokens 20 "$@"
