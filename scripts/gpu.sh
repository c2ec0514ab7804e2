#!/usr/bin/env bash
# The GPU runner. Run ON the GPU machine from the repo root (the device tool copies the tree there):
#   bash scripts/gpu.sh [benchmark ...]      e.g. bash scripts/gpu.sh quant_gemv "quant_fuzz --cases 200"
# (a benchmark is a module name, optionally with its arguments in the same word)
# It installs the wheels carried in .whl/ (made here by scripts/fetch_wheels.sh), builds the package
# (csrc/) against the image's own torch, runs `pytest -m gpu`, then each named benchmark module
# (benchmarks/<name>.py, default: $GPU_BENCHMARKS or none) and leaves everything under $OUT:
# pytest_gpu.log, bench.log, results.tgz (JSON + markdown tables), env.txt. GPU_TESTS=<paths> narrows
# the test run (default: tests/; "none" skips it); GPU_WORKERS=<n> runs it on n pytest-xdist workers, which steal
# queued tests from each other (xdist's default hands each worker a fixed share up front: one worker once got the three
# Triton fuzz tests and the two tests after them in a row and was the last to finish, past the call's limit);
# GPU_PROFILE="<fmt>:<M>[:<NxK>] ..." profiles the mma kernel's second launch at each (Nsight Compute, --set full,
# clocks untouched) after the benchmarks, into $OUT/profile.tgz (details page and per-instruction SASS counters).
# GPU_TIMEOUT=<seconds> bounds each step (default: none), so one slow step cannot eat a whole device call. The
# bound is a SIGINT first: a cut pytest still prints its failures and durations, and the log names every result
# as it lands (-v), so a cut run still says what passed (benchmarks write their results as they go). The mma
# extension is built before the tests, timed on its own, so the bound is the tests' time alone.
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
limit=(); [ -n "${GPU_TIMEOUT:-}" ] && limit=(timeout -s INT -k 30 "$GPU_TIMEOUT")
SECONDS=0
python3 -c 'from hf_efficient.kernels import quant_mma; print("mma extension built:", quant_mma.extension() is not None)' \
  2>&1 | tail -3
echo "extension step: ${SECONDS}s"
if [ "${GPU_TESTS:-tests}" != none ]; then
  # shellcheck disable=SC2086  # GPU_TESTS is a list of paths
  "${limit[@]}" python3 -m pytest -m gpu -v -rfE --durations=25 -p no:cacheprovider \
    ${GPU_WORKERS:+-n "$GPU_WORKERS" --dist worksteal} ${GPU_TESTS:-tests} >"$OUT/pytest_gpu.log" 2>&1 || rc=1
  grep -cE " (PASSED|FAILED|ERROR)( |$)" "$OUT/pytest_gpu.log" | sed 's/^/results logged: /'
  grep -vE "PASSED|Warning|warner" "$OUT/pytest_gpu.log" | tail -60 | cut -c1-300
fi
[ $# -gt 0 ] || set -- ${GPU_BENCHMARKS:-}
for b in "$@"; do
  echo "== benchmark $b" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086  # the benchmark's own arguments ride in the same word
  "${limit[@]}" python3 -m "benchmarks.${b%% *}" $([ "$b" = "${b%% *}" ] || echo "${b#* }") --out "$OUT/results" \
    2>&1 | tee -a "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
if [ -n "${GPU_PROFILE:-}" ]; then
  mkdir -p /tmp/hfe_profile
  for p in $GPU_PROFILE; do
    IFS=: read -r fmt m shape <<<"$p"
    shape=${shape:-28672x8192}
    name="${fmt}_m${m}_${shape}"
    "${limit[@]}" ncu --clock-control none -k regex:quant_mma_kernel --launch-skip 1 --launch-count 1 --set full \
      --import-source no -f -o "/tmp/hfe_profile/$name" python3 scripts/profile_quant.py --impl mma --fmt "$fmt" \
      --m "$m" --shape "$shape" >"/tmp/hfe_profile/$name.log" 2>&1 || rc=1
    ncu -i "/tmp/hfe_profile/$name.ncu-rep" --page details >"/tmp/hfe_profile/$name.details.txt" 2>&1
    ncu -i "/tmp/hfe_profile/$name.ncu-rep" --page source --csv --print-source sass >"/tmp/hfe_profile/$name.sass.csv" 2>&1
    rm -f "/tmp/hfe_profile/$name.ncu-rep"
    echo "profiled $name: $(grep -m1 -E 'Duration' "/tmp/hfe_profile/$name.details.txt")"
  done
  tar czf "$OUT/profile.tgz" -C /tmp/hfe_profile .
fi
tar czf "$OUT/results.tgz" -C "$OUT/results" . && rm -rf "$OUT/results"
exit $rc
