#!/usr/bin/env bash
# ScienceQA: answers -> IMG accuracy (and total, and the official breakdown). Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" sqa "$@"
