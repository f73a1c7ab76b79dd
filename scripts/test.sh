#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU only, no network). Extra args go to pytest.
source "$(dirname "$0")/env.sh" test
"$PY" -m pytest -q "$@"
