#!/usr/bin/env bash
# POPE (mean F1) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" pope "$@"
