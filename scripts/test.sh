#!/usr/bin/env bash
# Sets everything up, then lints, type-checks and runs the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
