#!/usr/bin/env bash
# Make a headless Chromium available for the status page's browser test: Debian's
# `chromium` package via apt-get (as root, or with passwordless sudo). Exits 1 if it is
# still missing; tests/test_ui.py then says so and skips. On macOS the test finds
# Google Chrome or Chromium where they are installed; nothing is installed here.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

have() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }
have && exit 0

if command -v apt-get >/dev/null; then
    apt_install chromium fonts-dejavu-core || die "chromium is missing and installing it needs root (apt-get install chromium)"
fi
have || die "chromium could not be installed"
