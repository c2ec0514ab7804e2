#!/usr/bin/env bash
# Compile the LUT kernels for AArch64 so the NEON engine (csrc/lut_gemm.cpp, HFE_LUT_NEON) is at least type-checked
# and instantiated; it cannot be run here (no ARM machine, no AArch64 libtorch). Needs Debian's
# g++-aarch64-linux-gnu (`apt-get install g++-aarch64-linux-gnu`) and the project venv (for torch's headers).
# Usage: bash scripts/check_neon.sh   -> exit 0 and "NEON engine compiled: N instantiations" on success.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
command -v "$CXX" >/dev/null || { echo "$CXX not found: apt-get install g++-aarch64-linux-gnu" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
INC=$("$PY" -c "import torch.utils.cpp_extension as c, sysconfig; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
OBJ=$(mktemp --suffix=.o)
trap 'rm -f "$OBJ"' EXIT
# shellcheck disable=SC2086
"$CXX" -std=c++17 -O2 -fopenmp -march=armv8-a -w -c csrc/lut_gemm.cpp -o "$OBJ" $INC
N=$(aarch64-linux-gnu-nm -C "$OBJ" | grep -c "tile_bitserial_neon" || true)
[ "$N" -ge 2 ] || { echo "NEON engine missing from the AArch64 object (found $N instantiations)" >&2; exit 1; }
echo "NEON engine compiled: $N instantiations"
