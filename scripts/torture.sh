#!/usr/bin/env bash
# The long version of the point-in-time recovery test (tests/tests/pitr.rs): a load generator
# writes for minutes while the archiver is killed with SIGKILL and restarted 100 times, then
# 1000 random targets (and every base's and the window's edges) are restored with
# tidemark-restore and compared key by key with what was written. First, every parser of the
# format gets many more hostile inputs than in CI (manifest/tests/hostile_input.rs). The S3
# variants run twice: against moto, then against LocalStack (scripts/s3-server.sh starts
# each in turn). Builds, and writes a JSON summary to bench/torture/<date>.json (also
# printed; each run names its server).
#
#   scripts/torture.sh
#
# Environment (defaults in brackets):
#   TIDEMARK_PITR_TARGETS  random restore targets over all variants (the S3 ones get
#                          their share again against each further server) [1000]
#   TIDEMARK_PITR_KILLS    archiver kills over all variants (likewise) [100]
#   TIDEMARK_PITR_SECONDS  seconds of writes per S3 variant and server; the local one
#                          writes 60% [120]
#   TIDEMARK_TORTURE_S3_SERVERS  the S3 servers, in order [moto localstack]
#   TIDEMARK_PITR_SEED     seed of the workloads and target choices [random, printed]
#   TIDEMARK_TORTURE_DIR   where the summary goes [bench/torture]
#   PROPTEST_CASES         hostile inputs per parser property [20000; CI runs 256]
# Exits non-zero if any parser failed or any target did not restore exactly as expected.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh)"
export TIDEMARK_CACHE CARGO_TARGET_DIR

export TIDEMARK_PITR_TARGETS="${TIDEMARK_PITR_TARGETS:-1000}"
export TIDEMARK_PITR_KILLS="${TIDEMARK_PITR_KILLS:-100}"
export TIDEMARK_PITR_SECONDS="${TIDEMARK_PITR_SECONDS:-120}"
# One seed for every variant, so that one number repeats the whole run's choices.
export TIDEMARK_PITR_SEED="${TIDEMARK_PITR_SEED:-$(od -An -N7 -tu8 /dev/urandom | tr -d ' ')}"
out_dir="${TIDEMARK_TORTURE_DIR:-bench/torture}"
export PROPTEST_CASES="${PROPTEST_CASES:-20000}"

started_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
started="$(date +%s)"

echo "== build (target directory: $CARGO_TARGET_DIR)"
# The same selection as scripts/test.sh, so that the build reuses its artifacts (building
# only the binaries, or one package, resolves dependency features differently and compiles
# the AWS SDK again).
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --test pitr --no-run

echo "== hostile input: $PROPTEST_CASES cases per parser property"
set +e
cargo test --workspace --locked --test hostile_input
parsers_status=$?
set -e

run_dir="$(mktemp -d "${TMPDIR:-/tmp}/tidemark-torture.XXXXXX")"
export TIDEMARK_RUN_DIR="$run_dir"
cleanup() { scripts/s3-server.sh stop || true; rm -rf "$run_dir"; }
trap cleanup EXIT
export TIDEMARK_REQUIRE_S3=1
read -r -a servers <<<"${TIDEMARK_TORTURE_S3_SERVERS:-moto localstack}"
[ "${#servers[@]}" -gt 0 ] || { echo "TIDEMARK_TORTURE_S3_SERVERS names no server" >&2; exit 2; }

# The first server gets every variant (the local one too); the others the S3 variants only.
status=0
filter=()
for server in "${servers[@]}"; do
  echo "== S3 server: $server"
  TIDEMARK_TEST_S3_SERVER="$server" scripts/s3-server.sh start
  eval "$(scripts/s3-server.sh env)"
  echo "== point-in-time recovery against $TIDEMARK_TEST_S3_SERVER_NAME: $TIDEMARK_PITR_TARGETS random targets, $TIDEMARK_PITR_KILLS kills, $TIDEMARK_PITR_SECONDS s of writes per variant, seed $TIDEMARK_PITR_SEED"
  export TIDEMARK_PITR_SUMMARY="$run_dir/pitr-runs-$server.json"
  set +e
  cargo test --workspace --locked --test pitr -- --nocapture --test-threads=1 "${filter[@]}"
  s=$?
  set -e
  [ "$status" -eq 0 ] && status=$s
  scripts/s3-server.sh stop
  filter=(_from_s3)
done
[ "$status" -eq 0 ] && status=$parsers_status
finished="$(date +%s)"

mkdir -p "$out_dir"
day="$(date -u +%Y-%m-%d)"
summary="$out_dir/$day.json"
[ -e "$summary" ] && summary="$out_dir/$day-$(date -u +%H%M%S).json"

python3 - "$run_dir" "$summary" "$started_at" "$((finished - started))" "$status" "${servers[@]}" <<'EOF'
import json, os, platform, subprocess, sys

run_dir, out_path, started_at, duration, status, *servers = sys.argv[1:]
runs = []
for server in servers:
    try:
        server_runs = json.load(open(os.path.join(run_dir, f"pitr-runs-{server}.json")))["runs"]
    except (OSError, ValueError, KeyError):
        server_runs = []
    for run in server_runs:
        if run.get("store") == "s3":
            run["s3_server"] = server
        runs.append(run)
# Every variant against the first server, the S3 ones (two) against each other.
expected_runs = 3 + 2 * (len(servers) - 1)

def meminfo(field):
    for line in open("/proc/meminfo"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

total = lambda f: sum(f(r) for r in runs)
summary = {
    "date": started_at,
    "machine": {
        "nproc": os.cpu_count(),
        "memory_bytes": meminfo("MemTotal"),
        "cpu": cpu_model(),
        "kernel": platform.release(),
    },
    "commit": git("rev-parse", "HEAD"),
    "uncommitted_changes": bool(git("status", "--porcelain")),
    "parameters": {
        "random_targets": int(os.environ["TIDEMARK_PITR_TARGETS"]),
        "kills": int(os.environ["TIDEMARK_PITR_KILLS"]),
        "write_seconds": float(os.environ["TIDEMARK_PITR_SECONDS"]),
        "seed": int(os.environ["TIDEMARK_PITR_SEED"]),
        "hostile_input_cases_per_property": int(os.environ["PROPTEST_CASES"]),
    },
    "targets_checked": total(lambda r: r["targets"]["checked"]),
    "random_targets_checked": total(lambda r: r["targets"]["random_seq"] + r["targets"]["random_time"]),
    "targets_refused_as_expected": total(lambda r: r["targets"]["refused_as_expected"]),
    "kills_survived": total(lambda r: r["kills"]["total"]),
    "faults_injected": 0,
    "mismatches": total(lambda r: r["mismatches"]),
    "variants_run": len(runs),
    "test_exit_status": int(status),
    "s3_servers": servers,
    "passed": int(status) == 0 and len(runs) == expected_runs and total(lambda r: r["mismatches"]) == 0,
    "duration_s": int(duration),
    "runs": runs,
}
with open(out_path, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
print(json.dumps(summary, indent=2))
EOF
echo "summary: $summary"
exit "$status"
