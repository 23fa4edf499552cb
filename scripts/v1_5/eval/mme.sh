#!/usr/bin/env bash
# MME: answers -> perception (headline) and cognition scores; also writes the official eval_tool's input files.
# Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" mme "$@"
