#!/usr/bin/env bash
# Tidemark end to end on the embedded default, on this machine alone:
#   1. a load generator writes to a demo RocksDB (3 column families, merges, range deletes,
#      constant flushes and compactions) and records what it wrote;
#   2. tidemark-archiver archives it, as a separate process, into a local-directory store;
#   3. tidemark-restore lists the window, restores a point in the middle (by time) and the
#      latest point;
#   4. both restored databases are compared, key by key, with what was written.
# Everything stays in ./demo-output (or $TIDEMARK_DEMO_DIR) to look at afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

eval "$(scripts/setup.sh)"
export TIDEMARK_CACHE CARGO_TARGET_DIR

out="$(realpath -m "${TIDEMARK_DEMO_DIR:-demo-output}")"
if [ -e "$out" ]; then
  if [ -f "$out/.tidemark-demo" ]; then
    rm -rf "$out"
  else
    echo "demo: $out exists and is not a previous demo's output; move it away or set TIDEMARK_DEMO_DIR" >&2
    exit 2
  fi
fi
mkdir -p "$out"
touch "$out/.tidemark-demo"

say "Building (the first build compiles RocksDB: about 25 minutes on 2 cores)"
cargo build --workspace --bins --locked
bin="$CARGO_TARGET_DIR/debug"

db="$out/db"; oracle="$out/written"; repo="file://$out/repository"
seconds="${TIDEMARK_DEMO_SECONDS:-20}"

say "Writing to a demo database for $seconds s (tidemark-loadgen → $db)"
"$bin/tidemark-loadgen" --db "$db" --out "$oracle" --duration "$seconds" --rate 400 \
  --marker-every 1 >"$out/loadgen.json" 2>"$out/loadgen.log" &
writer=$!
for _ in $(seq 100); do [ -f "$db/CURRENT" ] && break; sleep 0.1; done

say "Archiving it with tidemark-archiver (→ $repo)"
"$bin/tidemark-archiver" run --db "$db" --to "$repo" --sync-interval 500ms \
  --checkpoint-interval 5s --base-interval 8s 2>"$out/archiver.log" &
archiver=$!
trap 'kill $writer $archiver 2>/dev/null || true' EXIT

wait "$writer"
last_seq=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["last_seq"])' "$out/loadgen.json")
echo "the writer stopped at sequence $last_seq"

say "Waiting for the archiver to catch up"
for _ in $(seq 300); do
  newest=$("$bin/tidemark-archiver" status --to "$repo" --json 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("newest_seq") or 0)' || echo 0)
  [ "$newest" = "$last_seq" ] && break
  sleep 0.2
done
"$bin/tidemark-archiver" status --to "$repo"
kill -TERM "$archiver"; wait "$archiver" || true
trap - EXIT

say "The recovery window (tidemark-restore list)"
"$bin/tidemark-restore" list --from "$repo"

# A point in the middle of the writes, by time: halfway between the first and last write.
middle=$(python3 - "$oracle/times.jsonl" <<'EOF'
import json, sys, datetime
times = [json.loads(l)["unix_micros"] for l in open(sys.argv[1]) if l.strip()]
mid = (times[0] + times[-1]) // 2
print(datetime.datetime.fromtimestamp(mid / 1e6, datetime.timezone.utc).isoformat().replace("+00:00", "Z"))
EOF
)

say "Restoring the database as of $middle"
"$bin/tidemark-restore" restore --from "$repo" --target "$out/restored-middle" --time "$middle"
say "Checking it against what was written at $middle"
"$bin/tidemark-compare" --db "$out/restored-middle" --oracle "$oracle" --time "$middle"

say "Restoring the latest point"
"$bin/tidemark-restore" restore --from "$repo" --target "$out/restored-latest" --latest
say "Checking it against what was written last"
"$bin/tidemark-compare" --db "$out/restored-latest" --oracle "$oracle" --seq "$last_seq"

say "Done. Look around in $out: db/ (the source), repository/ (the store), restored-*/"
