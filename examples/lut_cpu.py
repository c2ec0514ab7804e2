"""T-MAC-style LUT kernels on the CPU: quantize the embedded model to INT4 on load and generate.

Run: ``python examples/lut_cpu.py [--bits 2] [--fmt nf]``. The quantized linears run on the C++ LUT kernels for
decoding (token-by-token); long prompts go through a dequantized BLAS matmul (see docs/lut.md).
"""
import argparse
import time

import torch

import hf_efficient  # noqa: F401  (registers quant_method "lut"; import it before from_pretrained)
from hf_efficient.models import load_model
from hf_efficient.quantization.lut import LUTConfig

ap = argparse.ArgumentParser()
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--fmt", default="int", choices=["int", "fp", "nf"])
ap.add_argument("--group-size", type=int, default=128)
args = ap.parse_args()

model, tok = load_model(None, quantization_config=LUTConfig(bits=args.bits, fmt=args.fmt,
                                                            group_size=args.group_size))
ids = tok("The quality of mercy is", return_tensors="pt").input_ids
t0 = time.perf_counter()
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
dt = time.perf_counter() - t0
print(tok.decode(out[0], skip_special_tokens=True))
print(f"{24 / dt:.1f} tokens/s on {torch.get_num_threads()} threads")
