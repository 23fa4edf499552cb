#!/usr/bin/env bash
# VQAv2 on InternVL2-1B: question + ' ' + instruction, 10 new tokens (InternVL's vqa/evaluate_vqa.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" vqav2 --prompt-style internvl2_vqa --max_new_tokens 10 "$@"
