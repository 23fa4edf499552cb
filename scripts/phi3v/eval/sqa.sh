#!/usr/bin/env bash
# ScienceQA (IMG accuracy) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" sqa "$@"
