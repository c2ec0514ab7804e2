"""Evaluate the embedded SmolLM2-135M-Instruct offline: perplexity on held-out plays, a sample, speed.

Run: python examples/evaluate_embedded.py [--max-tokens 4096]
"""
import argparse

import hf_efficient  # noqa: F401  (registers the suite with transformers)
from hf_efficient.data import token_ids
from hf_efficient.evaluation import evaluate, format_table
from hf_efficient.models import load_default

ap = argparse.ArgumentParser()
ap.add_argument("--max-tokens", type=int, default=4096)
args = ap.parse_args()

model, tok = load_default()
ids = token_ids(tok, "eval", max_tokens=args.max_tokens)
result = evaluate(model, tok, "smollm2-135m fp32", ids, context=2048, new_tokens=16)
print(format_table([result]))
print("sample:", result.sample)
