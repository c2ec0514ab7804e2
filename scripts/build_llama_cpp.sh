#!/usr/bin/env bash
# Builds llama.cpp (from the llama-cpp-python sdist, which vendors it) for the same-run CPU comparisons
# (benchmarks/lut_e2e.py, benchmarks/lut_cpu.py). `pip install llama-cpp-python` builds every tool and example and
# did not finish on a 2-core machine; this builds only the shared libraries (llama, ggml-base, ggml-cpu), natively
# for this CPU, and makes the unpacked Python package importable from a small venv without building it.
#
# Everything lives outside the repository (default /tmp); nothing of llama.cpp is committed.
#   scripts/build_llama_cpp.sh                 # then: python -m benchmarks.lut_e2e  (finds /tmp/llama-venv)
# Environment knobs: LLAMA_CPP_PYTHON_VERSION (sdist version, default pinned below), LLAMA_BUILD_ROOT
# (download/build folder), LLAMA_VENV (the venv), JOBS (parallel compile jobs), NICE (niceness of the compile),
# LLAMA_NATIVE=no_amx: the native ISA without AMX (AVX2/FMA/F16C/BMI2/AVX-VNNI/AVX-512 F, BW, VL, VBMI, VNNI,
# BF16 where the CPU has them). On the 2-core Sapphire Rapids VMs the native build's AMX backend repacks Q4_0
# and then segfaults at the first eval, so llama.cpp cannot run there at all.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${LLAMA_BUILD_ROOT:-/tmp/llama-build}"
VENV="${LLAMA_VENV:-/tmp/llama-venv}"
JOBS="${JOBS:-2}"
NICE="${NICE:-15}"

mkdir -p "$ROOT"
cd "$ROOT"
SRC="$ROOT/llama_cpp_python-$VERSION"
if [ ! -d "$SRC" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT"
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$LLAMA/build"

# GGML_NATIVE: -march=native, the comparison the targets ask for ("llama.cpp built natively for that machine").
# Shared libraries only: ggml-base/ggml-cpu are what benchmarks/llama_cpp_gemv.py loads, libllama what the binding
# loads. No common/tools/mtmd: the binding imports mtmd only for multimodal chat formats.
ISA=(-DGGML_NATIVE=ON)
if [ "${LLAMA_NATIVE:-}" = no_amx ]; then
  has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
       -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512bw)"
       -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
       -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "${ISA[@]}" \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_MTMD=OFF -DLLAMA_CURL=OFF
nice -n "$NICE" cmake --build "$BUILD" -j"$JOBS" --target llama

# The binding looks for its libraries in llama_cpp/lib (libllama there unless $LLAMA_CPP_LIB_PATH says otherwise;
# its ggml module always there), so point that folder at the build output instead of setting variables per run.
ln -sfn "$BUILD/bin" "$SRC/llama_cpp/lib"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q numpy typing-extensions diskcache jinja2
# A .pth file puts the unpacked package on the venv's path: equivalent to PYTHONPATH=$SRC, without building a wheel.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SRC" > "$SITE/llama_cpp_source.pth"

"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'from', llama_cpp.__file__)"
echo "ready: $VENV/bin/python (or PYTHONPATH=$SRC LLAMA_CPP_LIB_PATH=$BUILD/bin with any Python that has numpy)"
