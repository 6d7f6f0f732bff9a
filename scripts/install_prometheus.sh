#!/usr/bin/env bash
# Make `prometheus` and `promtool` available for the metrics tests: Debian's package
# via apt-get (as root, or with passwordless sudo), Homebrew's on macOS. Exits 1 if
# they are still missing; the tests that need them then say so and skip.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

have() { command -v prometheus >/dev/null && command -v promtool >/dev/null; }
have && exit 0

if command -v apt-get >/dev/null; then
    apt_install prometheus || die "prometheus is missing and installing it needs root (apt-get install prometheus)"
    # The package enables a system service; the tests start their own on a free port.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
elif command -v brew >/dev/null; then
    brew install prometheus
fi
have || die "prometheus could not be installed"
