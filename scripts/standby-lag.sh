#!/usr/bin/env bash
# Measures a warm standby's lag: the load generator writes RATE single-put batches a second
# for DURATION seconds while the archiver archives them (sync interval SYNC) into a local
# repository and `tidemark-restore follow --json` (poll interval POLL) keeps a standby
# current; then the standby is promoted (SIGUSR1) and the time to promotion is printed
# beside the lag percentiles.
#
# The lag of a segment, from the follower's status lines: `first_record_lag_seconds` is now
# minus the time of the segment's first record (the longest a record waited: sync interval
# + upload + poll + apply), `lag_seconds` the same for its last record. Record times are the
# archiver's observed times (when it read the WAL, within ~100 ms of the commit).
#
#   BIN=target/debug RATE=1000 DURATION=60 scripts/standby-lag.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug}
RATE=${RATE:-1000}
DURATION=${DURATION:-60}
POLL=${POLL:-1s}
SYNC=${SYNC:-1s}
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

repo="file://$WORK/repo"
mkdir -p "$WORK/repo"
"$BIN/tidemark-loadgen" --db "$WORK/db" --out "$WORK/oracle" --rate "$RATE" \
  --max-batch-ops 1 --large-value-every 0 --duration "$DURATION" >"$WORK/loadgen.log" 2>&1 &
writer=$!
pids+=("$writer")
until [ -f "$WORK/db/CURRENT" ]; do sleep 0.1; done
"$BIN/tidemark-archiver" run --db "$WORK/db" --to "$repo" --sync-interval "$SYNC" \
  >"$WORK/archiver.log" 2>&1 &
pids+=("$!")
until "$BIN/tidemark-restore" --quiet restore --dry-run --latest --from "$repo" \
  --target "$WORK/probe" >/dev/null 2>&1; do sleep 0.5; done
"$BIN/tidemark-restore" --quiet follow --json --from "$repo" --target "$WORK/standby" \
  --poll-interval "$POLL" >"$WORK/status.jsonl" 2>"$WORK/follow.log" &
follower=$!
pids+=("$follower")
wait "$writer"
sleep 5
start=$(date +%s%N)
kill -USR1 "$follower"
wait "$follower"
promoted=$(( ($(date +%s%N) - start) / 1000000 ))

python3 - "$WORK/status.jsonl" "$promoted" "$RATE" "$POLL" "$SYNC" <<'EOF'
import json, sys
path, promoted, rate, poll, sync = sys.argv[1:]
lines = [json.loads(l) for l in open(path) if l.startswith("{")]
applied = [l for l in lines if l.get("event") == "applied"]
final = lines[-1]
# The first ten segments are the catch-up after the first restore: not the steady state.
steady = applied[10:]
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
first = [l["first_record_lag_seconds"] for l in steady]
last = [l["lag_seconds"] for l in steady]
print(f"{rate} writes/s, sync interval {sync}, poll interval {poll}: {len(steady)} segments")
print(f"  oldest record of a segment: p50 {pct(first, 50):.2f} s, p99 {pct(first, 99):.2f} s, max {max(first):.2f} s")
print(f"  newest record of a segment: p50 {pct(last, 50):.2f} s, p99 {pct(last, 99):.2f} s")
print(f"  promotion: SIGUSR1 to exit {promoted} ms, {final['event']} at sequence {final['applied']['seq']}")
EOF
