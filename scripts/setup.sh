#!/usr/bin/env bash
# Installs what building and testing Tidemark needs on a fresh Debian machine, and prints the
# environment to use. Safe to run again: it only installs what is missing.
#
#   source <(scripts/setup.sh --env)   # just the environment
#   scripts/setup.sh                   # install, then print the environment
set -euo pipefail

cache="${TIDEMARK_CACHE:-$HOME/.cache/tidemark}"
target="${CARGO_TARGET_DIR:-$cache/target}"

if [ "${1:-}" = "--env" ]; then
  echo "export TIDEMARK_CACHE='$cache' CARGO_TARGET_DIR='$target'"
  exit 0
fi

log() { echo "[setup] $*" >&2; }

# bindgen (used by the bundled RocksDB build) needs libclang; a fresh machine lacks it.
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libclang\.so'; then
  log "installing libclang-dev (needed to build RocksDB's Rust bindings)"
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { log "libclang-dev is missing and this user cannot install it: run 'apt-get install -y libclang-dev' as root"; exit 1; }
    sudo_cmd=sudo
  fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libclang-dev >/dev/null
fi

for tool in cargo rustc python3; do
  command -v "$tool" >/dev/null || { log "$tool is not installed; install it (Rust through rustup, Python 3.11+) and run again"; exit 1; }
done

mkdir -p "$cache" "$target"
echo "export TIDEMARK_CACHE='$cache' CARGO_TARGET_DIR='$target'"
