#!/usr/bin/env bash
# The whole test suite, from a clean clone: installs what it needs, starts its own S3 server
# on 127.0.0.1, runs every test against the local-directory store and that server, and
# stops the server again. Exits non-zero on any failure.
#
#   scripts/test.sh                                    against moto (the default)
#   TIDEMARK_TEST_S3_SERVER=localstack scripts/test.sh against LocalStack
#   TIDEMARK_TEST_S3_SERVER=external TIDEMARK_TEST_S3_ENDPOINT=URL ... scripts/test.sh
#                                      against a server already running (MinIO, ...), with
#                                      the variables of README.md, "Testing"
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
for script in scripts/*.sh .ci/run; do bash -n "$script"; done

echo "== S3 server"
run_dir="$(mktemp -d "${TMPDIR:-/tmp}/tidemark-test.XXXXXX")"
export TIDEMARK_RUN_DIR="$run_dir"
if [ "${TIDEMARK_TEST_S3_SERVER:-}" = external ]; then
  trap 'rm -rf "$run_dir"' EXIT
  : "${TIDEMARK_TEST_S3_ENDPOINT:?TIDEMARK_TEST_S3_SERVER=external needs the URL of the server in TIDEMARK_TEST_S3_ENDPOINT}"
  : "${TIDEMARK_TEST_S3_AUTH:?set TIDEMARK_TEST_S3_AUTH to 1 if $TIDEMARK_TEST_S3_ENDPOINT rejects wrong signatures, 0 if not}"
  export TIDEMARK_TEST_S3_SERVER_NAME="${TIDEMARK_TEST_S3_SERVER_NAME:-the server at $TIDEMARK_TEST_S3_ENDPOINT}"
else
  cleanup() { scripts/s3-server.sh stop || true; rm -rf "$run_dir"; }
  trap cleanup EXIT
  scripts/s3-server.sh start
  eval "$(scripts/s3-server.sh env)"
fi
echo "S3 server for the tests: $TIDEMARK_TEST_S3_SERVER_NAME at $TIDEMARK_TEST_S3_ENDPOINT"

echo "== tests"
export TIDEMARK_REQUIRE_S3=1
status=0
cargo test --workspace --locked --no-fail-fast -- --nocapture 2>&1 | tee "$run_dir/test.log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
passed=$(grep -aoE '^test result: [A-Za-z]+\. [0-9]+ passed' "$run_dir/test.log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -aoE '^test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$run_dir/test.log" | awk '{s += $6} END {print s + 0}')
# Tests that found the server lacking what they need say so on a line of their own.
skipped=$(grep -aciE '^(!!! )?skipped' "$run_dir/test.log" || true)
echo
echo "tests: $passed passed, $failed failed, $skipped skipped"
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ] || [ "$passed" -eq 0 ]; then
  exit 1
fi
