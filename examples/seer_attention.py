"""SeerAttention on the embedded model: train gates briefly, then compare dense and sparse perplexity.

Run: ``python examples/seer_attention.py`` (CPU, a few minutes; use --steps/--context to scale).
"""
import argparse
import tempfile

import torch

import hf_efficient  # noqa: F401  (registers attn_implementation="seer_attention")
from hf_efficient.attention.seer import SeerAttentionConfig, configure, load_gates, save_gates, train_gates
from hf_efficient.data import token_ids
from hf_efficient.evaluation import perplexity
from hf_efficient.models import load_default

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--context", type=int, default=512)
args = ap.parse_args()

model, tok = load_default()
eval_ids = token_ids(tok, "eval", 2048)
print("dense PPL", perplexity(model, eval_ids, context=args.context, progress=False))

# Gates learn the frozen model's own block-pooled attention map (only gate parameters train).
train_gates(model, token_ids(tok, "train", 100_000), config=SeerAttentionConfig(block_size=64),
            seq_len=args.context, steps=args.steps)
gates_dir = tempfile.mkdtemp()
save_gates(model, gates_dir)                      # seer_gates.safetensors + seer_config.json

fresh, _ = load_default()
load_gates(fresh, gates_dir, sparsity=0.5)        # one call: gates + attn_implementation="seer_attention"
for sparsity in (0.5, 0.7, 0.9):
    configure(fresh, sparsity=sparsity)
    print(f"sparsity {sparsity:.0%} PPL", perplexity(fresh, eval_ids, context=args.context, progress=False))
with torch.no_grad():                             # generation: sparse prefill, dense decode
    ids = tok("To be, or not to be,", return_tensors="pt").input_ids
    print(tok.decode(fresh.generate(ids, max_new_tokens=20, do_sample=False)[0]))
