#!/usr/bin/env bash
# Chromium from Debian's packages for the console's browser tests (tests/e2e/test_console.py
# drives it with Playwright's driver; nothing is downloaded from a browser vendor). Needs root.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi
echo "$(chromium --version 2>/dev/null || echo chromium) is installed"
