#!/usr/bin/env bash
# Install the clients the compatibility suite drives (tests/test_clients.py): the Python
# ones (the `clients` extra) into .venv, Node and npm from Debian's packages if node is
# missing, then Claude Code and Codex CLI from npm into .cache/npm (each step skipped
# when already done). Failing here only makes those tests skip, with the reason.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PREFIX="$ROOT/.cache/npm"
PACKAGES=("@anthropic-ai/claude-code" "@openai/codex")

ensure_venv clients

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm || die "node and npm are missing and could not be installed (apt-get install nodejs npm)"
fi
missing=()
for package in "${PACKAGES[@]}"; do
    [ -f "$PREFIX/lib/node_modules/$package/package.json" ] || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} into $PREFIX"
    npm install --global --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "${missing[@]}" >&2 \
        || die "npm could not install ${missing[*]}"
fi
