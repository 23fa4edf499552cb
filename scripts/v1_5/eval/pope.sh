#!/usr/bin/env bash
# POPE: answers -> mean F1 over adversarial / popular / random. Settings: see _common.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/_common.sh" pope "$@"
