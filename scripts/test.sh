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
cargo test --workspace --locked --no-fail-fast -- --nocapture
