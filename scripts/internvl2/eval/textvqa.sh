#!/usr/bin/env bash
# TextVQA on InternVL2-1B: question + ' ' + instruction, 10 new tokens (InternVL's vqa/evaluate_vqa.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" textvqa --prompt-style internvl2_vqa --max_new_tokens 10 "$@"
