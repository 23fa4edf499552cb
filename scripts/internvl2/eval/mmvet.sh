#!/usr/bin/env bash
# MM-Vet on InternVL2-1B: question + ' ', 1000 new tokens (InternVL's mmvet/evaluate_mmvet.py) (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmvet --prompt-style internvl2_mmvet --max_new_tokens 1000 "$@"
