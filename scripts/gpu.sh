#!/usr/bin/env bash
# The GPU runner. Run ON the GPU machine from the repo root (the device tool copies the tree there):
#   bash scripts/gpu.sh [benchmark ...]      e.g. bash scripts/gpu.sh quant_gemv "quant_fuzz --cases 200"
# (a benchmark is a module name, optionally with its arguments in the same word)
# It installs the wheels carried in .whl/ (made here by scripts/fetch_wheels.sh), builds the package
# (csrc/) against the image's own torch, runs `pytest -m gpu`, then each named benchmark module
# (benchmarks/<name>.py, default: $GPU_BENCHMARKS or none) and leaves everything under $OUT:
# pytest_gpu.log, bench.log, results.tgz (JSON + markdown tables), env.txt. GPU_TESTS=<paths> narrows
# the test run (default: tests/; "none" skips it); GPU_TIMEOUT=<seconds> bounds each step (default: none), so
# one slow step cannot eat a whole device call (benchmarks write their results as they go).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} | tee "$OUT/env.txt"
rc=0
limit=(); [ -n "${GPU_TIMEOUT:-}" ] && limit=(timeout "$GPU_TIMEOUT")
if [ "${GPU_TESTS:-tests}" != none ]; then
  "${limit[@]}" python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/pytest_gpu.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
fi
[ $# -gt 0 ] || set -- ${GPU_BENCHMARKS:-}
for b in "$@"; do
  echo "== benchmark $b" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086  # the benchmark's own arguments ride in the same word
  "${limit[@]}" python3 -m "benchmarks.${b%% *}" $([ "$b" = "${b%% *}" ] || echo "${b#* }") --out "$OUT/results" \
    2>&1 | tee -a "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
tar czf "$OUT/results.tgz" -C "$OUT/results" . && rm -rf "$OUT/results"
exit $rc
