#!/usr/bin/env bash
# Installs munet with its test dependencies, then runs the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
python -m ruff check .
python -m pytest -q "$@"
