#!/usr/bin/env bash
# The AFPQ/MoFQ quality table on the GPU machine, rows split over parallel processes (one GPU, many cores).
# Needs the embedded model staged first (scripts/carry_model.sh) and the wheels in .whl/:
#   bash scripts/gpu_quality.sh [shards=6] [extra benchmark args...]
# Leaves $OUT/quality.tgz (merged table + every shard's JSON and log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT/q"
SHARDS=${1:-6}; shift || true
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
export PYTHONPATH=/root/hfe_model/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PYTHONPATH:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/q/install.log" 2>&1 \
  || { tail -30 "$OUT/q/install.log"; exit 1; }
# Convert the GGUF once before the shards start (each would otherwise race to do it).
python3 -c 'from hf_efficient.models import default_model_path; print(default_model_path())' || exit 1
for k in $(seq 0 $((SHARDS - 1))); do
  timeout "${SHARD_TIMEOUT:-480}" python3 -m benchmarks.quality_afpq_mofq --device cuda --shard "$k/$SHARDS" \
    --out "$OUT/q/s$k" "$@" >"$OUT/q/s$k.log" 2>&1 &
done
wait
dirs=$(for k in $(seq 0 $((SHARDS - 1))); do [ -f "$OUT/q/s$k/quality_afpq_mofq.json" ] && echo "$OUT/q/s$k"; done)
python3 -m benchmarks.quality_afpq_mofq --merge $dirs --out "$OUT/q/merged"
cat "$OUT/q/merged/quality_afpq_mofq.md"
grep -h "ppl=" "$OUT"/q/s*.log | sort
tar czf "$OUT/quality.tgz" -C "$OUT" q && rm -rf "$OUT/q"
