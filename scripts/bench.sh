#!/usr/bin/env bash
# Tidemark benchmarks, from a clean clone: builds release binaries, starts its own S3 server
# (moto on 127.0.0.1), runs every measure several times and writes
# bench/results/<date>.json and bench/results/<date>.md (median, min and max of the runs,
# with a description of the machine).
#
#   scripts/bench.sh            the full run (about 25 minutes on 2 cores)
#   scripts/bench.sh --quick    a smoke run with tiny sizes (a few minutes; results go to
#                               bench/results/<date>-quick.*)
#
# At the end, bench/check.py compares the run's key ratios (archiver ÷ writer, restore ÷
# plain GET, base download ÷ plain GET, first open ÷ WAL-off ceiling) with the newest
# committed run of the same kind and fails (exit 1) when one is worse by more than 20 %;
# the Markdown report shows them beside the previous run's. Run the check by hand with
# `python3 bench/check.py bench/results/NEW.json [--baseline bench/results/OLD.json]`.
#
# Measures:
#   1. durable archive lag: a writer at a fixed rate with a time marker in every batch; the
#      store is polled for new segments; a write's lag is from its commit to the moment a
#      segment holding it is seen in the store. Local store and S3 server, sync interval
#      1 s and 100 ms, two rates, two value sizes.
#   2. archiver cost: CPU seconds per GB of WAL, peak RSS, segments and store write requests
#      per hour, stored bytes per WAL byte; idle (nothing may be uploaded), at a moderate rate
#      (the 1k writes/s runs of measure 1) and as fast as the writer goes; then the drain:
#      the archiver is paused (SIGSTOP) while the writer goes as fast as it can, and resumed
#      when the database's flushes and compactions of the burst are done (so that the
#      archiver has the CPU to itself, as the writer had); the backlog's WAL MB ÷ the seconds
#      to ship it, over the writer's rate. The racing drain resumes it as soon as the writer
#      stops, sharing the CPU with those compactions.
#   3. restore of a base + a minute of WAL from the S3 server, by phase, against a plain
#      parallel download of the same objects, RocksDB's BackupEngine restoring from a local
#      directory, and a checkpoint tarball (tar | zstd, one object) downloaded and unpacked.
#   4. replay: the application's first open of the restored database (RocksDB's recovery
#      applies the re-created WAL) against applying the same records with the WAL disabled.
#   5. incremental bases: bytes uploaded by a base after 1% of the keys changed.
#
# Sizes come from the environment (defaults in brackets, --quick in parentheses):
#   BENCH_REPS [3] (2)                 runs of each measure
#   BENCH_LAG_SECONDS [6] (3)          seconds of writing per lag run
#   BENCH_LAG_RATES ["1000 5000"] ("1000")   write batches per second (one put each)
#   BENCH_LAG_VALUES ["100 4096"] ("100")    value sizes in bytes
#   BENCH_LAG_SYNCS ["1s 100ms"] ("1s")      archiver --sync-interval values
#   BENCH_STORES ["local s3"]          stores for measures 1 and 2
#   BENCH_IDLE_SECONDS [30] (5)        the idle observation
#   BENCH_MAX_SECONDS [15] (3)         seconds of writing as fast as possible
#   BENCH_MAX_CONFIGS ["local:100 local:4096 s3:4096"] ("local:4096")  store:value size
#   BENCH_DRAIN_SECONDS [10] (3)       seconds of backlog written for the drain (same configs)
#   BENCH_RACING_CONFIGS ["local:4096"] ("local:4096")  configs of the racing drain
#   BENCH_RESTORE_STORE [s3]           store of measures 3-5 (s3 or local)
#   BENCH_RESTORE_KEYS [4000000] (50000)     keys of the restored database
#   BENCH_RESTORE_VALUE [1024]         their value size in bytes
#   BENCH_RESTORE_WAL_SECONDS [60] (5) seconds of writes archived after the base
#   BENCH_RESTORE_WAL_RATE [10000] (1000)    their rate (batches of one put per second)
#   BENCH_INCR_FRACTION [0.01]         share of keys changed before the second base
#   BENCH_WORK_DIR [$TIDEMARK_CACHE/bench-work]  scratch space (needs ~20 GB, plus the S3 server's
#                                      temporary files; emptied first)
#   BENCH_SKIP_BUILD [0]               1: use the release binaries already built
#   BENCH_BIN_DIR [$CARGO_TARGET_DIR/release]  where the binaries are (with BENCH_SKIP_BUILD=1)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

quick=0
case "${1:-}" in
--quick) quick=1 ;;
"") ;;
*)
  echo "usage: $0 [--quick]" >&2
  exit 2
  ;;
esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 4))" "$1" "$2"; }
load1() { cut -d' ' -f1 /proc/loadavg; }
json_get() { # json_get FILE PYTHON-EXPRESSION-ON-d
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"
}

if [ "$quick" = 1 ]; then
  d_reps=2 d_lag_seconds=3 d_lag_rates="1000" d_lag_values="100" d_lag_syncs="1s"
  d_idle=5 d_max_seconds=3 d_max_configs="local:4096" d_drain_seconds=3
  d_restore_keys=50000 d_restore_wal_seconds=5 d_restore_wal_rate=1000
else
  d_reps=3 d_lag_seconds=6 d_lag_rates="1000 5000" d_lag_values="100 4096" d_lag_syncs="1s 100ms"
  d_idle=30 d_max_seconds=15 d_max_configs="local:100 local:4096 s3:4096" d_drain_seconds=10
  d_restore_keys=4000000 d_restore_wal_seconds=60 d_restore_wal_rate=10000
fi
REPS="${BENCH_REPS:-$d_reps}"
LAG_SECONDS="${BENCH_LAG_SECONDS:-$d_lag_seconds}"
LAG_RATES="${BENCH_LAG_RATES:-$d_lag_rates}"
LAG_VALUES="${BENCH_LAG_VALUES:-$d_lag_values}"
LAG_SYNCS="${BENCH_LAG_SYNCS:-$d_lag_syncs}"
STORES="${BENCH_STORES:-local s3}"
IDLE_SECONDS="${BENCH_IDLE_SECONDS:-$d_idle}"
MAX_SECONDS="${BENCH_MAX_SECONDS:-$d_max_seconds}"
MAX_CONFIGS="${BENCH_MAX_CONFIGS:-$d_max_configs}"
DRAIN_SECONDS="${BENCH_DRAIN_SECONDS:-$d_drain_seconds}"
RACING_CONFIGS="${BENCH_RACING_CONFIGS:-local:4096}"
RESTORE_STORE="${BENCH_RESTORE_STORE:-s3}"
RESTORE_KEYS="${BENCH_RESTORE_KEYS:-$d_restore_keys}"
RESTORE_VALUE="${BENCH_RESTORE_VALUE:-1024}"
RESTORE_WAL_SECONDS="${BENCH_RESTORE_WAL_SECONDS:-$d_restore_wal_seconds}"
RESTORE_WAL_RATE="${BENCH_RESTORE_WAL_RATE:-$d_restore_wal_rate}"
INCR_FRACTION="${BENCH_INCR_FRACTION:-0.01}"

eval "$(scripts/setup.sh)"
export TIDEMARK_CACHE CARGO_TARGET_DIR
if ! command -v zstd >/dev/null; then
  echo "[bench] installing zstd (for the checkpoint tarball comparison)" >&2
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq zstd >/dev/null
fi

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  say "Building release binaries (the first release build compiles RocksDB: about 20 minutes on 2 cores)"
  cargo build --release --workspace --bins --locked
fi
bin="${BENCH_BIN_DIR:-$CARGO_TARGET_DIR/release}"
binaries="release build"
[ -z "${BENCH_BIN_DIR:-}" ] || binaries="binaries from $BENCH_BIN_DIR"
for b in tidemark-bench tidemark-archiver tidemark-restore; do
  [ -x "$bin/$b" ] || { echo "bench: $bin/$b is missing" >&2; exit 1; }
done

work="$(realpath -m "${BENCH_WORK_DIR:-$TIDEMARK_CACHE/bench-work}")"
case "$work" in
/ | "$HOME" | "$root" | "$root"/*) echo "bench: refusing BENCH_WORK_DIR=$work" >&2; exit 2 ;;
esac
rm -rf "$work"
mkdir -p "$work"
results="$work/results.jsonl"
: >"$results"
started_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
load_at_start="$(cut -d' ' -f1-3 /proc/loadavg)"

say "S3 server (moto on 127.0.0.1)"
export TIDEMARK_RUN_DIR="$work/s3-server"
cleanup() {
  local pids
  pids="$(jobs -p)"
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
  scripts/s3-server.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
scripts/s3-server.sh start
eval "$(scripts/s3-server.sh env)"
s3_log="$TIDEMARK_RUN_DIR/s3-server.log"
bucket="tidemark-bench"
"$TIDEMARK_CACHE/venv-moto/bin/python" - "$TIDEMARK_TEST_S3_ENDPOINT" "$bucket" <<'EOF'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").create_bucket(Bucket=sys.argv[2])
EOF
export TIDEMARK_ENDPOINT_URL="$TIDEMARK_TEST_S3_ENDPOINT" TIDEMARK_PATH_STYLE=true

# record MEASURE CONFIG-JSON REP RESULT-FILE: one line of results.jsonl
record() {
  python3 - "$1" "$2" "$3" "$4" "$(load1)" >>"$results" <<'EOF'
import json, sys
measure, config, rep, path, load = sys.argv[1:6]
print(json.dumps({"measure": measure, "config": json.loads(config), "rep": int(rep),
                  "load1": float(load), "result": json.load(open(path))}))
EOF
}

store_url() { # store_url STORE NAME
  case "$1" in
  local) echo "file://$work/stores/$2" ;;
  s3) echo "s3://$bucket/$2" ;;
  *) echo "bench: unknown store $1" >&2; exit 2 ;;
  esac
}
request_log_args() { [ "$1" = s3 ] && echo "--request-log $s3_log" || true; }
s3_pid="$(sed -n 's/^PID=//p' "$TIDEMARK_RUN_DIR/s3-server.state")"
server_pid_args() { [ "$1" = s3 ] && echo "--server-pid $s3_pid" || true; }

# ---------------------------------------------------------------------------------------
say "1. Durable archive lag ($REPS runs of $LAG_SECONDS s per configuration)"
for rep in $(seq 1 "$REPS"); do
  for store in $STORES; do
    for sync in $LAG_SYNCS; do
      for rate in $LAG_RATES; do
        for value in $LAG_VALUES; do
          name="lag-$store-$sync-$rate-$value-$rep"
          echo "  $name (load $(load1))" >&2
          # shellcheck disable=SC2046
          "$bin/tidemark-bench" archive --dir "$work/run" --to "$(store_url "$store" "$name")" \
            --archiver "$bin/tidemark-archiver" --sync-interval "$sync" --rate "$rate" \
            --seconds "$LAG_SECONDS" --value-size "$value" --lag \
            $(request_log_args "$store") >"$work/out.json"
          record lag "{\"store\":\"$store\",\"sync\":\"$sync\",\"rate\":$rate,\"value\":$value}" \
            "$rep" "$work/out.json"
          rm -rf "$work/stores"
        done
      done
    done
  done
done

# ---------------------------------------------------------------------------------------
say "2. Archiver cost: idle for $IDLE_SECONDS s, and writing as fast as possible for $MAX_SECONDS s"
for store in $STORES; do
  name="idle-$store"
  echo "  $name (load $(load1))" >&2
  # shellcheck disable=SC2046
  "$bin/tidemark-bench" archive --dir "$work/run" --to "$(store_url "$store" "$name")" \
    --archiver "$bin/tidemark-archiver" --idle-seconds "$IDLE_SECONDS" --seconds 0 \
    $(request_log_args "$store") >"$work/out.json"
  record idle "{\"store\":\"$store\"}" 1 "$work/out.json"
  rm -rf "$work/stores"
done
for rep in $(seq 1 "$REPS"); do
  for cfg in $MAX_CONFIGS; do
    store="${cfg%%:*}" value="${cfg##*:}"
    name="max-$store-$value-$rep"
    echo "  $name (load $(load1))" >&2
    # shellcheck disable=SC2046
    "$bin/tidemark-bench" archive --dir "$work/run" --to "$(store_url "$store" "$name")" \
      --archiver "$bin/tidemark-archiver" --rate 0 --seconds "$MAX_SECONDS" \
      --value-size "$value" $(request_log_args "$store") >"$work/out.json"
    record max "{\"store\":\"$store\",\"value\":$value}" "$rep" "$work/out.json"
    rm -rf "$work/stores"
  done
done
# drain MEASURE STORE VALUE REP [--settle]
drain() {
  local measure="$1" store="$2" value="$3" rep="$4" name="$1-$2-$3-$4"
  shift 4
  echo "  $name (load $(load1))" >&2
  # shellcheck disable=SC2046
  "$bin/tidemark-bench" archive --dir "$work/run" --to "$(store_url "$store" "$name")" \
    --archiver "$bin/tidemark-archiver" --rate 0 --seconds "$DRAIN_SECONDS" --drain "$@" \
    --value-size "$value" $(request_log_args "$store") $(server_pid_args "$store") >"$work/out.json"
  record "$measure" "{\"store\":\"$store\",\"value\":$value}" "$rep" "$work/out.json"
  rm -rf "$work/stores"
}
for rep in $(seq 1 "$REPS"); do
  for cfg in $MAX_CONFIGS; do
    drain drain "${cfg%%:*}" "${cfg##*:}" "$rep" --settle
  done
  for cfg in $RACING_CONFIGS; do
    drain drain-racing "${cfg%%:*}" "${cfg##*:}" "$rep"
  done
done
rm -rf "$work/run"

# ---------------------------------------------------------------------------------------
say "3. Restore: a database of $RESTORE_KEYS keys x $RESTORE_VALUE B, then $RESTORE_WAL_SECONDS s of writes at $RESTORE_WAL_RATE/s"
src="$work/source-db"
repo="$(store_url "$RESTORE_STORE" restore-repo)"
rcfg="{\"store\":\"$RESTORE_STORE\",\"keys\":$RESTORE_KEYS,\"value\":$RESTORE_VALUE,\"wal_seconds\":$RESTORE_WAL_SECONDS,\"wal_rate\":$RESTORE_WAL_RATE}"
"$bin/tidemark-bench" load --db "$src" --keys "$RESTORE_KEYS" --value-size "$RESTORE_VALUE" >"$work/out.json"
record db-load "$rcfg" 1 "$work/out.json"

archiver_status() { "$bin/tidemark-archiver" status --to "$repo" --json 2>/dev/null || echo '{}'; }
t0="$(now)"
"$bin/tidemark-archiver" run --db "$src" --to "$repo" --sync-interval 1s \
  >"$work/restore-archiver.out" 2>"$work/restore-archiver.log" &
archiver=$!
until [ "$(archiver_status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("bases", 0))')" -ge 1 ]; do
  kill -0 "$archiver" 2>/dev/null || { tail "$work/restore-archiver.log" >&2; exit 1; }
  sleep 0.2
done
t1="$(now)"
echo "{\"secs\": $(elapsed "$t0" "$t1")}" >"$work/out.json"
record first-base "$rcfg" 1 "$work/out.json"
"$bin/tidemark-bench" write --db "$src" --rate "$RESTORE_WAL_RATE" --seconds "$RESTORE_WAL_SECONDS" \
  --keys "$RESTORE_KEYS" --value-size "$RESTORE_VALUE" --seed 2 >"$work/write.json"
record wal-writes "$rcfg" 1 "$work/write.json"
last_seq="$(json_get "$work/write.json" 'd["last_seq"]')"
until [ "$(archiver_status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("newest_seq") or 0)')" -ge "$last_seq" ]; do
  kill -0 "$archiver" 2>/dev/null || { tail "$work/restore-archiver.log" >&2; exit 1; }
  sleep 0.2
done
kill -TERM "$archiver"
wait "$archiver" || true

# The alternatives' backups, made once: BackupEngine into a local directory, and a
# checkpoint packed with tar | zstd and uploaded as one object.
"$bin/tidemark-bench" backup-engine-create --db "$src" --backup-dir "$work/backup-engine" >"$work/out.json"
record backup-engine-create "$rcfg" 1 "$work/out.json"
t0="$(now)"
"$bin/tidemark-bench" checkpoint --db "$src" --target "$work/checkpoint" >"$work/ckpt.json"
t1="$(now)"
tar -C "$work/checkpoint" -cf - . | zstd -q -T0 -3 -o "$work/checkpoint.tar.zst"
t2="$(now)"
tarball_url="$(store_url "$RESTORE_STORE" tarball)"
"$bin/tidemark-bench" put-file --store-url "$tarball_url" --key db.tar.zst \
  --file "$work/checkpoint.tar.zst" >"$work/put.json"
t3="$(now)"
python3 - "$work/ckpt.json" "$work/put.json" "$(elapsed "$t0" "$t1")" "$(elapsed "$t1" "$t2")" \
  "$(elapsed "$t2" "$t3")" >"$work/out.json" <<'EOF'
import json, sys
ckpt, put = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
c, p, u = map(float, sys.argv[3:6])
print(json.dumps({"checkpoint_bytes": ckpt["bytes"], "tarball_bytes": put["bytes"],
                  "checkpoint_secs": c, "pack_secs": p, "upload_secs": u, "total_secs": c + p + u}))
EOF
record tarball-create "$rcfg" 1 "$work/out.json"
rm -rf "$work/checkpoint" "$work/checkpoint.tar.zst"

for rep in $(seq 1 "$REPS"); do
  echo "  restore run $rep (load $(load1))" >&2
  target="$work/restored"
  rm -rf "$target"
  python3 bench/peak_rss.py "$work/out.json" \
    "$bin/tidemark-restore" -q restore --from "$repo" --target "$target" --latest --json
  record tidemark-restore "$rcfg" "$rep" "$work/out.json"
  # 4. Replay: the same records without the WAL first (it reads the restored WAL files),
  # then the application's first open.
  "$bin/tidemark-bench" replay-ceiling --restored "$target" --scratch "$work/ceiling" >"$work/out.json"
  record replay-ceiling "$rcfg" "$rep" "$work/out.json"
  "$bin/tidemark-bench" open --db "$target" >"$work/out.json"
  record first-open "$rcfg" "$rep" "$work/out.json"
  rm -rf "$target"
  # Every block of the base's tables read as well (--verify standard).
  "$bin/tidemark-restore" -q restore --from "$repo" --target "$target" --latest --verify standard \
    --json >"$work/out.json"
  record tidemark-restore-standard "$rcfg" "$rep" "$work/out.json"
  rm -rf "$target"
  # The fastest way to a usable database: no verification by the restore tool (the
  # application's first open is then the only replay).
  "$bin/tidemark-restore" -q restore --from "$repo" --target "$target" --latest --verify off \
    --json >"$work/out.json"
  record tidemark-restore-unverified "$rcfg" "$rep" "$work/out.json"
  "$bin/tidemark-bench" open --db "$target" >"$work/out.json"
  record first-open-unverified "$rcfg" "$rep" "$work/out.json"
  rm -rf "$target"

  "$bin/tidemark-bench" get-plan --from "$repo" --dir "$work/get" >"$work/out.json"
  record plain-get "$rcfg" "$rep" "$work/out.json"

  "$bin/tidemark-bench" backup-engine-restore --backup-dir "$work/backup-engine" \
    --target "$work/be-restored" >"$work/out.json"
  record backup-engine-restore "$rcfg" "$rep" "$work/out.json"
  "$bin/tidemark-bench" open --db "$work/be-restored" >"$work/out.json"
  record backup-engine-open "$rcfg" "$rep" "$work/out.json"
  rm -rf "$work/be-restored"

  t0="$(now)"
  "$bin/tidemark-bench" get-file --store-url "$tarball_url" --key db.tar.zst \
    --file "$work/db.tar.zst" >"$work/get.json"
  t1="$(now)"
  mkdir -p "$work/unpacked"
  zstd -q -d -c "$work/db.tar.zst" | tar -C "$work/unpacked" -xf -
  t2="$(now)"
  "$bin/tidemark-bench" open --db "$work/unpacked" >"$work/open.json"
  python3 - "$work/get.json" "$work/open.json" "$(elapsed "$t0" "$t1")" "$(elapsed "$t1" "$t2")" \
    >"$work/out.json" <<'EOF'
import json, sys
get, opened = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
d, u = float(sys.argv[3]), float(sys.argv[4])
print(json.dumps({"tarball_bytes": get["bytes"], "download_secs": d, "unpack_secs": u,
                  "total_secs": d + u, "open_secs": opened["open_secs"]}))
EOF
  record tarball-restore "$rcfg" "$rep" "$work/out.json"
  rm -rf "$work/unpacked" "$work/db.tar.zst"
done
rm -rf "$work/backup-engine"

# ---------------------------------------------------------------------------------------
say "5. Incremental base backups: $INCR_FRACTION of the keys changed"
base_backup() { # base_backup OUT-JSON: a one-shot base backup; its logged statistics
  "$bin/tidemark-archiver" --log-json backup --db "$src" --to "$repo" >/dev/null 2>"$work/backup.log"
  python3 - "$work/backup.log" >"$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    f = e.get("fields", {})
    if f.get("message") == "base backup taken":
        up, dedup = f["bytes_uploaded"], f["bytes_deduplicated"]
        print(json.dumps({"bytes_uploaded": up, "bytes_deduplicated": dedup,
                          "bytes_total": up + dedup, "files": f.get("files"),
                          "uploaded_share": up / max(1, up + dedup),
                          "duration_ms": f.get("duration_ms")}))
        break
else:
    sys.exit("no 'base backup taken' line in the archiver's log")
EOF
}
icfg="{\"store\":\"$RESTORE_STORE\",\"keys\":$RESTORE_KEYS,\"value\":$RESTORE_VALUE,\"fraction\":$INCR_FRACTION}"
"$bin/tidemark-bench" update --db "$src" --fraction 0 --keys "$RESTORE_KEYS" \
  --value-size "$RESTORE_VALUE" >/dev/null
base_backup "$work/out.json"
record base-full "$icfg" 1 "$work/out.json"
for rep in $(seq 1 "$REPS"); do
  echo "  incremental run $rep (load $(load1))" >&2
  "$bin/tidemark-bench" update --db "$src" --fraction "$INCR_FRACTION" --keys "$RESTORE_KEYS" \
    --value-size "$RESTORE_VALUE" --seed $((100 + rep)) --no-compactions >"$work/update.json"
  record update-flush "$icfg" "$rep" "$work/update.json"
  base_backup "$work/out.json"
  record base-after-flush "$icfg" "$rep" "$work/out.json"
  "$bin/tidemark-bench" update --db "$src" --fraction 0 --keys "$RESTORE_KEYS" \
    --value-size "$RESTORE_VALUE" --seed $((200 + rep)) >"$work/update.json"
  record update-settle "$icfg" "$rep" "$work/update.json"
  base_backup "$work/out.json"
  record base-after-compaction "$icfg" "$rep" "$work/out.json"
done

# ---------------------------------------------------------------------------------------
say "Report"
finished_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
load_at_end="$(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p bench/results
stamp="$(date -u +%Y-%m-%d)"
[ "$quick" = 1 ] && stamp="$stamp-quick"
if [ -e "bench/results/$stamp.json" ]; then stamp="$stamp-$(date -u +%H%M)"; fi
python3 bench/report.py --results "$results" --out "bench/results/$stamp" \
  --started "$started_at" --finished "$finished_at" \
  --load-start "$load_at_start" --load-end "$load_at_end" --quick "$quick" \
  --s3-server "$TIDEMARK_TEST_S3_SERVER_NAME" --binaries "$binaries" --settings "$(
    python3 -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' \
      REPS="$REPS" LAG_SECONDS="$LAG_SECONDS" LAG_RATES="$LAG_RATES" LAG_VALUES="$LAG_VALUES" \
      LAG_SYNCS="$LAG_SYNCS" STORES="$STORES" IDLE_SECONDS="$IDLE_SECONDS" \
      MAX_SECONDS="$MAX_SECONDS" MAX_CONFIGS="$MAX_CONFIGS" DRAIN_SECONDS="$DRAIN_SECONDS" RACING_CONFIGS="$RACING_CONFIGS" RESTORE_STORE="$RESTORE_STORE" \
      RESTORE_KEYS="$RESTORE_KEYS" RESTORE_VALUE="$RESTORE_VALUE" \
      RESTORE_WAL_SECONDS="$RESTORE_WAL_SECONDS" RESTORE_WAL_RATE="$RESTORE_WAL_RATE" \
      INCR_FRACTION="$INCR_FRACTION"
  )"
echo "results: bench/results/$stamp.json and bench/results/$stamp.md" >&2
rm -rf "$src"

say "Regression check (key ratios against the newest committed run of the same kind)"
check_status=0
python3 bench/check.py "bench/results/$stamp.json" || check_status=$?
case "$check_status" in
0) ;;
2) echo "bench: nothing to compare with yet; the ratios above are the first of their kind" >&2 ;;
*) echo "bench: a key ratio is worse by more than 20 % (see above)" >&2; exit 1 ;;
esac
