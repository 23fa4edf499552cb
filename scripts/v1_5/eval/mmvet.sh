#!/usr/bin/env bash
# MM-Vet: answers -> MM-Vet's grader input (answers_upload/$CKPT.json), then the GPT grade when a judge is
# configured (JUDGE_MODEL, OPENAI_API_KEY, optionally OPENAI_BASE_URL; see docs/evaluation.md). Settings: _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mmvet "$@"
