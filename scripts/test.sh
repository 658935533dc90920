#!/usr/bin/env bash
# Run the test suite: sets up .venv and runs pytest (the integration test fetches the embedded
# assets into the cache on first use). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# the import contract (pyproject.toml [tool.importlinter]): layers, no cycles
lint-imports --no-cache >/dev/null || lint-imports --no-cache
python -m pytest -q "$@"
