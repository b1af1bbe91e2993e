#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs, starts its own S3 server
# on 127.0.0.1, runs every test against the local-directory store and that server, and
# stops the server again. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh)"
export TIDEMARK_CACHE CARGO_TARGET_DIR

echo "== build (target directory: $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/check-layering.sh

echo "== S3 server"
run_dir="$(mktemp -d "${TMPDIR:-/tmp}/tidemark-test.XXXXXX")"
export TIDEMARK_RUN_DIR="$run_dir"
cleanup() { scripts/s3-server.sh stop || true; rm -rf "$run_dir"; }
trap cleanup EXIT
scripts/s3-server.sh start
eval "$(scripts/s3-server.sh env)"
echo "S3 server for the tests: $TIDEMARK_TEST_S3_SERVER at $TIDEMARK_TEST_S3_ENDPOINT"

echo "== tests"
export TIDEMARK_REQUIRE_S3=1
status=0
cargo test --workspace --locked --no-fail-fast -- --nocapture 2>&1 | tee "$run_dir/test.log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
passed=$(grep -aoE '^test result: [A-Za-z]+\. [0-9]+ passed' "$run_dir/test.log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -aoE '^test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$run_dir/test.log" | awk '{s += $6} END {print s + 0}')
echo
echo "tests: $passed passed, $failed failed"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ] || [ "$passed" -eq 0 ]; then
  exit 1
fi
