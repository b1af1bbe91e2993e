#!/usr/bin/env bash
# A real S3 server on 127.0.0.1 for Tidemark's tests, without Docker: moto in a Python venv.
#
#   scripts/s3-server.sh start    start it (idempotent: reuses a running one)
#   scripts/s3-server.sh env      print the exports the tests need; use as
#                                 eval "$(scripts/s3-server.sh env)"
#   scripts/s3-server.sh status   say whether it runs, and where
#   scripts/s3-server.sh stop     stop it (idempotent)
#
# The server checks request signatures: at start an IAM user with an access key is created
# through moto's IAM API, then moto is switched to enforcing authentication, so requests
# signed with any other key are rejected (TIDEMARK_TEST_S3_AUTH=1 tells the tests so).
# Set TIDEMARK_S3_AUTH=0 to run it without authentication.
#
# Environment:
#   TIDEMARK_CACHE        cache root (default ~/.cache/tidemark); the venv is venv-moto in it
#   TIDEMARK_RUN_DIR      where the state file (s3-server.state) and the log (s3-server.log)
#                         go (default $TIDEMARK_CACHE/run); one server per run directory
#   TIDEMARK_S3_PORT      fixed port (default: a free one)
#   TIDEMARK_S3_AUTH      1 (default) to enforce authentication, 0 not to
#   TIDEMARK_PYTHON       python used to create the venv (default python3; needs 3.9+)
set -euo pipefail

MOTO_VERSION=5.2.5
HOST=127.0.0.1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TIDEMARK_CACHE:-$HOME/.cache/tidemark}"
VENV="$CACHE/venv-moto"
RUN_DIR="${TIDEMARK_RUN_DIR:-$CACHE/run}"
STATE="$RUN_DIR/s3-server.state"
LOG="$RUN_DIR/s3-server.log"
PYTHON="${TIDEMARK_PYTHON:-python3}"
AUTH="${TIDEMARK_S3_AUTH:-1}"
REGION=us-east-1
# Used only when authentication is off (moto then accepts any key).
OPEN_ACCESS_KEY=tidemark-test
OPEN_SECRET_KEY=tidemark-test-secret

log() { echo "s3-server: $*" >&2; }
die() { log "error: $*"; exit 1; }

state_get() { # state_get NAME -> value from the state file (empty if absent)
    [[ -f "$STATE" ]] || return 0
    sed -n "s/^$1=//p" "$STATE" | head -n 1
}

is_moto_pid() { # the pid is alive and is a moto server
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q moto_server
}

answers() { # moto's own API answers on the port
    curl -fsS -o /dev/null --max-time 2 "http://$HOST:$1/moto-api/" 2>/dev/null
}

running() { # a live, answering server is recorded in the state file
    local pid port
    pid="$(state_get PID)"
    port="$(state_get PORT)"
    [[ -n "$pid" && -n "$port" ]] && is_moto_pid "$pid" && answers "$port"
}

ensure_venv() {
    mkdir -p "$CACHE"
    # One installer at a time, even if several shells start the server at once.
    exec 9>"$CACHE/venv-moto.lock"
    flock 9
    if [[ -x "$VENV/bin/moto_server" ]] &&
        "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null; then
        exec 9>&-
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3 or set TIDEMARK_PYTHON"
    log "creating $VENV with moto $MOTO_VERSION (one time, about a minute)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON (on Debian/Ubuntu: apt-get install python3-venv)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" ||
        { rm -rf "$VENV"; die "pip install of moto[server]==$MOTO_VERSION failed (see above)"; }
    exec 9>&-
}

free_port() {
    "$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('$HOST', 0)); print(s.getsockname()[1]); s.close()"
}

stop_pid() {
    local pid="$1" i
    is_moto_pid "$pid" || return 0
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        is_moto_pid "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

launch() { # launch PORT -> echoes the pid once the server answers; fails otherwise
    local port="$1" pid i
    : >"$LOG"
    # New session, so the server outlives the shell that started it; exec keeps the pid.
    "$VENV/bin/python" -c '
import os, sys
try:
    os.setsid()
except OSError:
    pass
os.execv(sys.argv[1], sys.argv[1:])
' "$VENV/bin/moto_server" -H "$HOST" -p "$port" </dev/null >>"$LOG" 2>&1 &
    pid=$!
    for i in $(seq 1 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if answers "$port"; then
            echo "$pid"
            return 0
        fi
        sleep 0.1
    done
    log "moto did not answer on port $port within 30 s"
    stop_pid "$pid"
    return 1
}

cmd_start() {
    mkdir -p "$RUN_DIR"
    if running; then
        log "already running at http://$HOST:$(state_get PORT) (pid $(state_get PID))"
        return 0
    fi
    if [[ -f "$STATE" ]]; then
        log "removing stale state file $STATE"
        stop_pid "$(state_get PID)"
        rm -f "$STATE"
    fi
    ensure_venv

    local attempt port pid=""
    for attempt in 1 2 3 4 5; do
        port="${TIDEMARK_S3_PORT:-$(free_port)}"
        if pid="$(launch "$port")"; then
            break
        fi
        pid=""
        if grep -qi "address already in use" "$LOG"; then
            [[ -z "${TIDEMARK_S3_PORT:-}" ]] || die "port $port is taken; unset TIDEMARK_S3_PORT or choose another"
            log "port $port was taken meanwhile; trying another"
            continue
        fi
        tail -n 20 "$LOG" >&2 || true
        die "moto did not start (log: $LOG)"
    done
    [[ -n "$pid" ]] || die "could not find a free port after 5 attempts"

    local access_key="$OPEN_ACCESS_KEY" secret_key="$OPEN_SECRET_KEY" auth=0 keys
    if [[ "$AUTH" == 1 ]]; then
        if ! keys="$("$VENV/bin/python" "$SCRIPT_DIR/s3-server-auth.py" "http://$HOST:$port" 2>>"$LOG")"; then
            stop_pid "$pid"
            tail -n 20 "$LOG" >&2 || true
            die "could not set up authentication in moto (log: $LOG); TIDEMARK_S3_AUTH=0 starts it without"
        fi
        read -r access_key secret_key <<<"$keys"
        auth=1
    fi

    local tmp="$STATE.tmp.$$"
    {
        echo "PID=$pid"
        echo "PORT=$port"
        echo "AUTH=$auth"
        echo "ACCESS_KEY=$access_key"
        echo "SECRET_KEY=$secret_key"
    } >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$STATE"
    log "moto $MOTO_VERSION running at http://$HOST:$port (pid $pid, authentication $([[ $auth == 1 ]] && echo enforced || echo off))"
    log "load its environment with: eval \"\$($0 env)\""
}

cmd_stop() {
    if [[ ! -f "$STATE" ]]; then
        log "not running"
        return 0
    fi
    local pid
    pid="$(state_get PID)"
    stop_pid "$pid"
    rm -f "$STATE"
    log "stopped (pid $pid)"
}

cmd_env() {
    running || die "no S3 server is running; start one with: $0 start"
    local port
    port="$(state_get PORT)"
    echo "export TIDEMARK_TEST_S3_ENDPOINT=http://$HOST:$port"
    echo "export TIDEMARK_TEST_S3_SERVER='moto $MOTO_VERSION'"
    echo "export TIDEMARK_TEST_S3_AUTH=$(state_get AUTH)"
    echo "export AWS_ACCESS_KEY_ID=$(state_get ACCESS_KEY)"
    echo "export AWS_SECRET_ACCESS_KEY=$(state_get SECRET_KEY)"
    echo "export AWS_REGION=$REGION"
    echo "unset AWS_SESSION_TOKEN AWS_PROFILE"
}

cmd_status() {
    if running; then
        echo "running at http://$HOST:$(state_get PORT) (pid $(state_get PID), auth $(state_get AUTH))"
    else
        echo "not running"
        return 1
    fi
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
env) cmd_env ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|env|status" >&2
    exit 2
    ;;
esac
