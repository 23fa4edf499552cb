#!/usr/bin/env bash
# VQAv2 (test-dev submission, or val with VQAV2_ANNOTATIONS) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" vqav2 "$@"
