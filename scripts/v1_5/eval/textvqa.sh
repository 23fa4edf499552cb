#!/usr/bin/env bash
# TextVQA (val, with the OCR-token prompt): answers -> VQA accuracy. Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" textvqa "$@"
