#!/usr/bin/env bash
# TextVQA (VQA accuracy on val, with LLaVA's OCR-token lines) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" textvqa "$@"
