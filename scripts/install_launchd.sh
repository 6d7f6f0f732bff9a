#!/usr/bin/env bash
# Run mlx-server as a LaunchAgent (macOS): it starts at login and restarts after a
# crash, but not after a clean stop.
#
#   scripts/install_launchd.sh              install or update it, and (re)start it
#   scripts/install_launchd.sh --uninstall  stop it and remove it
#   scripts/install_launchd.sh --dry-run    print the plist it would install; touch nothing in launchd
#
# The plist (launchd/mlx-server.plist.in) is rendered with absolute paths: the venv's
# mlx-server, the config, and ~/Library/Logs/mlx-server/ for the log. The config is
# checked before anything is installed. Environment: MLX_SERVER_CONFIG (default:
# models.yaml here).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LABEL="local.mlx-server"
PLIST="$HOME/Library/LaunchAgents/$LABEL.plist"
LOG_DIR="$HOME/Library/Logs/mlx-server"
SERVICE="gui/$(id -u)/$LABEL"

mode=install
case "${1:-}" in
    "") ;;
    --uninstall) mode=uninstall ;;
    --dry-run) mode=dry-run ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
esac

if [ "$mode" != dry-run ] && ! command -v launchctl >/dev/null; then
    die "launchctl not found: LaunchAgents are macOS only (--dry-run prints the plist anywhere)"
fi

if [ "$mode" = uninstall ]; then
    if launchctl bootout "$SERVICE" 2>/dev/null; then
        echo "stopped $LABEL"
    else
        echo "$LABEL was not running"
    fi
    rm -f "$PLIST"
    echo "removed $PLIST (the logs stay in $LOG_DIR)"
    exit 0
fi

ensure_venv
ensure_demo
read_server_config
rendered="$("$VENV/bin/python" "$HELPERS" render-plist "$ROOT/launchd/mlx-server.plist.in" \
    --label "$LABEL" --program "$VENV/bin/mlx-server" --config "$CONFIG" --root "$ROOT" \
    --log-dir "$LOG_DIR" --path "$VENV/bin:/usr/bin:/bin:/usr/sbin:/sbin")"

if [ "$mode" = dry-run ]; then
    printf '%s\n' "$rendered"
    exit 0
fi

mkdir -p "$LOG_DIR" "$(dirname "$PLIST")"
printf '%s\n' "$rendered" >"$PLIST.new"
plutil -lint "$PLIST.new" >/dev/null || die "the rendered plist does not pass plutil -lint: $PLIST.new"

# One daemon per port: the old service and the start script's daemon make way.
if launchctl bootout "$SERVICE" 2>/dev/null; then
    say "stopping the running $LABEL"
    for _ in $(seq 1 $(( (${GRACE%.*} + 15) * 5 ))); do  # its streams may take the grace period
        launchctl print "$SERVICE" >/dev/null 2>&1 || break
        sleep 0.2
    done
fi
"$VENV/bin/python" "$HELPERS" port-free "$HOST" "$PORT" $(own_pid) || { rm -f "$PLIST.new"; exit 1; }
stop_own_daemon

mv "$PLIST.new" "$PLIST"
launchctl enable "$SERVICE"
launchctl bootstrap "gui/$(id -u)" "$PLIST" || die "launchctl bootstrap failed; see: launchctl print $SERVICE"
echo "installed $PLIST"

if "$VENV/bin/python" "$HELPERS" wait "$URL" 0 120 30; then
    echo "mlx-server is running at $URL"
    echo
    "$VENV/bin/mlx-server" ps --all --url "$URL"
else
    echo "mlx-server did not answer yet; the log says why:" >&2
    tail -n 20 "$LOG_DIR/mlx-server.log" >&2 || true
fi
cat <<EOF

logs:     tail -f "$LOG_DIR/mlx-server.log"
status:   launchctl print $SERVICE | head -30      (state, pid, last exit code)
models:   $VENV/bin/mlx-server ps --all
restart:  launchctl kickstart -k $SERVICE
stop:     launchctl kill SIGTERM $SERVICE          (a clean stop: it stays stopped until login)
remove:   $0 --uninstall
EOF
