#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the whole test suite.
# GPU tests are marked and skip themselves where CUDA is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
