#!/usr/bin/env bash
# Cross-compile the LUT engines + csrc/lut/tools/engine_check.cpp for AArch64 and run them under qemu-user:
# the NEON engine against the scalar engine, bit for bit (tests/test_neon.py does the same inside pytest).
# Installs the Debian cross tools first when missing and apt-get is usable:  bash scripts/check_neon.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user g++-aarch64-linux-gnu
  else
    echo "need aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: apt-get install qemu-user g++-aarch64-linux-gnu)" >&2
    exit 2
  fi
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
aarch64-linux-gnu-g++ -O2 -std=c++17 -static csrc/lut/tools/engine_check.cpp csrc/lut/scalar.cpp \
  csrc/lut/dispatch.cpp csrc/lut/avx2.cpp csrc/lut/avx512.cpp csrc/lut/neon.cpp -o "$out/engine_check"
qemu-aarch64 "$out/engine_check" neon
