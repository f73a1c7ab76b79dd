#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU only, no network). Extra args go to pytest.
source "$(dirname "$0")/env.sh" test
# The report test renders the page in headless Chromium (Debian's package) when it can be installed.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "chromium could not be installed; the report rendering test will be skipped"
fi
"$PY" -m pytest -q "$@"
