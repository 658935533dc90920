#!/usr/bin/env bash
# Run the test suite: sets up .venv and runs pytest (the integration test fetches the embedded
# assets into the cache on first use). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m pytest -q "$@"
