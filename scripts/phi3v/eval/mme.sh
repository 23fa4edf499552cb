#!/usr/bin/env bash
# MME (perception score) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mme "$@"
