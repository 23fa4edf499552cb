#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild: answers -> GPT review against GPT-4's answers -> relative score, when a judge is
# configured (JUDGE_MODEL, OPENAI_API_KEY, optionally OPENAI_BASE_URL; see docs/evaluation.md). Settings: _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" llavabench "$@"
