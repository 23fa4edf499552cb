#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild (answers; reviewed by the GPT judge when JUDGE_MODEL is set) on Phi-3-vision: its chat template, LLaVA's questions (see _common.sh here).
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" llavabench "$@"
