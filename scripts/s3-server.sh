#!/usr/bin/env bash
# A real S3 server on 127.0.0.1 for Tidemark's tests, without Docker: moto (the default) or
# LocalStack, each in its own Python venv under the cache.
#
#   scripts/s3-server.sh start    start it (idempotent: reuses a running one)
#   scripts/s3-server.sh env      print the exports the tests need; use as
#                                 eval "$(scripts/s3-server.sh env)"
#   scripts/s3-server.sh status   say whether it runs, which server, and where
#   scripts/s3-server.sh stop     stop it and remove its data (idempotent)
#
# moto checks request signatures: at start an IAM user with an access key is created
# through moto's IAM API, then moto is switched to enforcing authentication, so requests
# signed with any other key are rejected (TIDEMARK_TEST_S3_AUTH=1 tells the tests so).
# Set TIDEMARK_S3_AUTH=0 to run it without authentication. LocalStack accepts any
# credentials and has no IAM users (TIDEMARK_TEST_S3_AUTH=0, TIDEMARK_TEST_S3_IAM=0): the
# tests that need them say so and are skipped.
#
# `env` exports what the tests read: TIDEMARK_TEST_S3_ENDPOINT, TIDEMARK_TEST_S3_SERVER (the
# kind, moto or localstack: the same word that selects it), TIDEMARK_TEST_S3_SERVER_NAME (a
# description, e.g. 'moto 5.2.5'), TIDEMARK_TEST_S3_AUTH (1: wrong signatures are
# rejected), TIDEMARK_TEST_S3_IAM (1: users with policies can be created through
# scripts/s3-server-user.py), and the AWS credentials.
#
# Environment:
#   TIDEMARK_TEST_S3_SERVER  which server `start` runs: moto (default) or localstack;
#                         `env`, `status` and `stop` act on whichever runs (`external`, a
#                         server this script does not run, is for scripts/test.sh)
#   TIDEMARK_CACHE        cache root (default ~/.cache/tidemark); the venvs are venv-moto
#                         and venv-localstack in it
#   TIDEMARK_RUN_DIR      where the state file (s3-server.state), the log (s3-server.log) and
#                         LocalStack's data go (default $TIDEMARK_CACHE/run); one server per
#                         run directory
#   TIDEMARK_S3_PORT      fixed port (default: a free one)
#   TIDEMARK_S3_AUTH      moto: 1 (default) to enforce authentication, 0 not to
#   TIDEMARK_PYTHON       python used to create moto's venv (default python3; needs 3.9+)
#   TIDEMARK_LOCALSTACK_PYTHON  python used to create LocalStack's venv (needs 3.13+;
#                         default: the first of python3.14, python3.13, python3 on PATH or
#                         in ~/.pyenv/versions that is new enough)
set -euo pipefail

MOTO_VERSION=5.2.5
LOCALSTACK_VERSION=2026.3.0
# Newer releases of these do not work with that LocalStack release (localstack/README.md).
LOCALSTACK_PINS=("localstack-core[base-runtime]==$LOCALSTACK_VERSION" "cbor2<6" "pyopenssl<25" "cryptography<45" service_identity)
HOST=127.0.0.1
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TIDEMARK_CACHE:-$HOME/.cache/tidemark}"
RUN_DIR="${TIDEMARK_RUN_DIR:-$CACHE/run}"
STATE="$RUN_DIR/s3-server.state"
LOG="$RUN_DIR/s3-server.log"
PYTHON="${TIDEMARK_PYTHON:-python3}"
AUTH="${TIDEMARK_S3_AUTH:-1}"
REGION=us-east-1
# Used only when authentication is off (moto then accepts any key).
OPEN_ACCESS_KEY=tidemark-test
OPEN_SECRET_KEY=tidemark-test-secret
# The kind `start` runs; the other commands read the kind from the state file.
KIND="${TIDEMARK_TEST_S3_SERVER:-moto}"
case "$KIND" in
moto | localstack) ;;
external)
    echo "s3-server: error: TIDEMARK_TEST_S3_SERVER=external names a server this script does not run: the tests use TIDEMARK_TEST_S3_ENDPOINT and its credentials as they are (README.md, Testing)" >&2
    exit 2
    ;;
*)
    echo "s3-server: error: TIDEMARK_TEST_S3_SERVER='$KIND' is not a server this script runs: use moto or localstack" >&2
    exit 2
    ;;
esac

log() { echo "s3-server: $*" >&2; }
die() { log "error: $*"; exit 1; }

state_get() { # state_get NAME -> value from the state file (empty if absent)
    [[ -f "$STATE" ]] || return 0
    sed -n "s/^$1=//p" "$STATE" | head -n 1
}

venv_of() { echo "$CACHE/venv-$1"; }

server_name() { # server_name KIND -> the description the tests print
    case "$1" in
    moto) echo "moto $MOTO_VERSION" ;;
    localstack) echo "LocalStack $LOCALSTACK_VERSION" ;;
    esac
}

is_server_pid() { # is_server_pid KIND PID: the pid is alive and is that server
    local kind="$1" pid="$2" pattern
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    case "$kind" in
    moto) pattern=moto_server ;;
    localstack) pattern=localstack.runtime.main ;;
    *) return 1 ;;
    esac
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$pattern"
}

answers() { # answers KIND PORT: the server's own API answers on the port
    local path=/moto-api/
    [[ "$1" == localstack ]] && path=/_localstack/health
    curl -fsS -o /dev/null --max-time 2 "http://$HOST:$2$path" 2>/dev/null
}

running() { # a live, answering server is recorded in the state file
    local kind pid port
    kind="$(state_get KIND)"
    kind="${kind:-moto}"
    pid="$(state_get PID)"
    port="$(state_get PORT)"
    [[ -n "$pid" && -n "$port" ]] && is_server_pid "$kind" "$pid" && answers "$kind" "$port"
}

# The python LocalStack's venv is made with: TIDEMARK_LOCALSTACK_PYTHON, else the first one
# found that is 3.13 or newer (LocalStack imports warnings.deprecated, new in 3.13).
localstack_python() {
    local candidates=() p
    if [[ -n "${TIDEMARK_LOCALSTACK_PYTHON:-}" ]]; then
        candidates=("$TIDEMARK_LOCALSTACK_PYTHON")
    else
        for p in python3.14 python3.13 python3; do
            command -v "$p" >/dev/null 2>&1 && candidates+=("$(command -v "$p")")
        done
        # pyenv's, newest first.
        while IFS= read -r p; do
            [[ -x "$p" ]] && candidates+=("$p")
        done < <(ls -d "$HOME"/.pyenv/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV)
    fi
    for p in "${candidates[@]}"; do
        if "$p" -c 'import sys, venv; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    if [[ -n "${TIDEMARK_LOCALSTACK_PYTHON:-}" ]]; then
        die "TIDEMARK_LOCALSTACK_PYTHON=$TIDEMARK_LOCALSTACK_PYTHON is not a Python 3.13 or newer with venv; LocalStack $LOCALSTACK_VERSION needs one"
    fi
    die "LocalStack $LOCALSTACK_VERSION needs Python 3.13 or newer, and none was found (tried python3.14, python3.13, python3 and ~/.pyenv/versions/3.13+). Install one (pyenv install 3.13, or apt-get install python3.13 python3.13-venv) or point TIDEMARK_LOCALSTACK_PYTHON at one"
}

venv_ready() { # venv_ready KIND: installed, at the pinned version
    local venv
    venv="$(venv_of "$1")"
    case "$1" in
    moto)
        [[ -x "$venv/bin/moto_server" ]] &&
            "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null
        ;;
    localstack)
        "$venv/bin/python" -c "import importlib.metadata as m, sys, localstack.runtime.main; sys.exit(sys.version_info < (3, 13) or m.version('localstack-core') != '$LOCALSTACK_VERSION')" 2>/dev/null
        ;;
    esac
}

ensure_venv() { # ensure_venv KIND
    local kind="$1" venv python pins
    venv="$(venv_of "$kind")"
    mkdir -p "$CACHE"
    # One installer at a time, even if several shells start a server at once.
    exec 9>"$venv.lock"
    flock 9
    if venv_ready "$kind"; then
        exec 9>&-
        return 0
    fi
    case "$kind" in
    moto)
        python="$PYTHON"
        command -v "$python" >/dev/null || die "$python not found; install Python 3 or set TIDEMARK_PYTHON"
        pins=("moto[server]==$MOTO_VERSION")
        ;;
    localstack)
        python="$(localstack_python)"
        pins=("${LOCALSTACK_PINS[@]}")
        ;;
    esac
    log "creating $venv with $(server_name "$kind") (one time, a minute or a few)"
    rm -rf "$venv"
    "$python" -m venv "$venv" || die "cannot create a venv with $python (on Debian/Ubuntu: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" ||
        { rm -rf "$venv"; die "pip install of ${pins[*]} failed (see above)"; }
    venv_ready "$kind" || { rm -rf "$venv"; die "$(server_name "$kind") did not install into $venv"; }
    exec 9>&-
}

free_port() {
    "$(venv_of "$KIND")/bin/python" -c "import socket; s = socket.socket(); s.bind(('$HOST', 0)); print(s.getsockname()[1]); s.close()"
}

stop_pid() { # stop_pid KIND PID: the server and its process group (it runs in its own session)
    local kind="$1" pid="$2" i tenths=100
    is_server_pid "$kind" "$pid" || return 0
    # LocalStack shuts its services down in order on SIGTERM, which can take a while.
    [[ "$kind" == localstack ]] && tenths=300
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for i in $(seq 1 "$tenths"); do
        is_server_pid "$kind" "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid did not stop within $((tenths / 10)) s of SIGTERM; sending SIGKILL"
    kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
}

# LocalStack's files: FILESYSTEM_ROOT, its temporary directory and its object data, all
# inside the run directory so that stop removes them. Its object data would otherwise go to
# /tmp/localstack-s3-storage, hard-coded and shared by every LocalStack on the machine:
# LS_MAIN points it at the run directory, then runs LocalStack's main module.
LS_DATA="$RUN_DIR/localstack"
LS_MAIN='
import runpy, sys
import localstack.services.s3.provider as provider
provider.DEFAULT_S3_TMP_DIR = sys.argv.pop(1)
runpy.run_module("localstack.runtime.main", run_name="__main__", alter_sys=True)
'

launch() { # launch PORT -> echoes the pid once the server answers; fails otherwise
    local port="$1" pid i venv cmd=()
    venv="$(venv_of "$KIND")"
    : >"$LOG"
    case "$KIND" in
    moto) cmd=("$venv/bin/moto_server" -H "$HOST" -p "$port") ;;
    localstack)
        rm -rf "$LS_DATA"
        mkdir -p "$LS_DATA/root" "$LS_DATA/tmp" "$LS_DATA/s3-storage"
        # hypercorn binds GATEWAY_LISTEN only (the default server binds 0.0.0.0 too).
        cmd=(env GATEWAY_SERVER=hypercorn "GATEWAY_LISTEN=$HOST:$port" SERVICES=s3
            EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 DISABLE_EVENTS=1 OVERRIDE_IN_DOCKER=0
            "FILESYSTEM_ROOT=$LS_DATA/root" "TMPDIR=$LS_DATA/tmp"
            "$venv/bin/python" -c "$LS_MAIN" "$LS_DATA/s3-storage")
        ;;
    esac
    # New session, so the server outlives the shell that started it; exec keeps the pid.
    "$venv/bin/python" -c '
import os, sys
try:
    os.setsid()
except OSError:
    pass
os.execvp(sys.argv[1], sys.argv[1:])
' "${cmd[@]}" </dev/null >>"$LOG" 2>&1 &
    pid=$!
    for i in $(seq 1 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if is_server_pid "$KIND" "$pid" && answers "$KIND" "$port"; then
            echo "$pid"
            return 0
        fi
        sleep 0.1
    done
    log "$KIND did not answer on port $port within 60 s"
    stop_pid "$KIND" "$pid"
    return 1
}

# moto: an IAM user whose key alone is accepted from now on (s3-server-auth.py).
# Prints ACCESS_KEY SECRET_KEY AUTH IAM.
credentials() {
    local port="$1" pid="$2" keys
    if [[ "$KIND" == moto && "$AUTH" == 1 ]]; then
        if ! keys="$("$(venv_of moto)/bin/python" "$SCRIPT_DIR/s3-server-auth.py" "http://$HOST:$port" 2>>"$LOG")"; then
            stop_pid "$KIND" "$pid"
            tail -n 20 "$LOG" >&2 || true
            die "could not set up authentication in moto (log: $LOG); TIDEMARK_S3_AUTH=0 starts it without"
        fi
        echo "$keys 1 1"
    elif [[ "$KIND" == moto ]]; then
        echo "$OPEN_ACCESS_KEY $OPEN_SECRET_KEY 0 0"
    else
        # LocalStack accepts any key and checks no signature; it has no enforced IAM. A
        # random secret all the same: the tests look for it in the programs' output.
        echo "tidemark-localstack $(od -An -N16 -tx1 /dev/urandom | tr -d ' \n') 0 0"
    fi
}

cmd_start() {
    mkdir -p "$RUN_DIR"
    if running; then
        local kind
        kind="$(state_get KIND)"
        kind="${kind:-moto}"
        [[ "$kind" == "$KIND" ]] ||
            die "$kind already runs for $RUN_DIR; stop it first ($0 stop) to start $KIND"
        log "already running at http://$HOST:$(state_get PORT) (pid $(state_get PID))"
        return 0
    fi
    if [[ -f "$STATE" ]]; then
        log "removing stale state file $STATE"
        cleanup_recorded
    fi
    ensure_venv "$KIND"

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
        die "$KIND did not start (log: $LOG)"
    done
    [[ -n "$pid" ]] || die "could not find a free port after 5 attempts"

    local access_key secret_key auth iam
    read -r access_key secret_key auth iam <<<"$(credentials "$port" "$pid")"
    [[ -n "$iam" ]] || exit 1

    local tmp="$STATE.tmp.$$"
    {
        echo "KIND=$KIND"
        echo "PID=$pid"
        echo "PORT=$port"
        echo "AUTH=$auth"
        echo "IAM=$iam"
        echo "ACCESS_KEY=$access_key"
        echo "SECRET_KEY=$secret_key"
    } >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$STATE"
    log "$(server_name "$KIND") running at http://$HOST:$port (pid $pid, signatures $([[ $auth == 1 ]] && echo checked || echo not checked))"
    log "load its environment with: eval \"\$($0 env)\""
}

# Stops the recorded server and removes what it kept on disk.
cleanup_recorded() {
    local kind
    kind="$(state_get KIND)"
    kind="${kind:-moto}"
    stop_pid "$kind" "$(state_get PID)"
    [[ "$kind" == localstack ]] && rm -rf "$LS_DATA"
    rm -f "$STATE"
}

cmd_stop() {
    if [[ ! -f "$STATE" ]]; then
        log "not running"
        return 0
    fi
    local pid kind
    pid="$(state_get PID)"
    kind="$(state_get KIND)"
    cleanup_recorded
    log "stopped ${kind:-moto} (pid $pid)"
}

cmd_env() {
    running || die "no S3 server is running; start one with: $0 start"
    local port kind
    port="$(state_get PORT)"
    kind="$(state_get KIND)"
    kind="${kind:-moto}"
    echo "export TIDEMARK_TEST_S3_ENDPOINT=http://$HOST:$port"
    echo "export TIDEMARK_TEST_S3_SERVER=$kind"
    echo "export TIDEMARK_TEST_S3_SERVER_NAME='$(server_name "$kind")'"
    echo "export TIDEMARK_TEST_S3_AUTH=$(state_get AUTH)"
    echo "export TIDEMARK_TEST_S3_IAM=$(state_get IAM)"
    echo "export AWS_ACCESS_KEY_ID=$(state_get ACCESS_KEY)"
    echo "export AWS_SECRET_ACCESS_KEY=$(state_get SECRET_KEY)"
    echo "export AWS_REGION=$REGION"
    echo "unset AWS_SESSION_TOKEN AWS_PROFILE TIDEMARK_TEST_S3_BUCKET TIDEMARK_TEST_S3_PREFIX"
}

cmd_status() {
    if running; then
        local kind
        kind="$(state_get KIND)"
        echo "$(server_name "${kind:-moto}") running at http://$HOST:$(state_get PORT) (pid $(state_get PID), auth $(state_get AUTH))"
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
