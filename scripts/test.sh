#!/usr/bin/env bash
# Set up (if needed) and run the lint and the whole test suite.
source "$(dirname "$0")/env.sh"
ruff check src tests
python -m pytest "$@"
