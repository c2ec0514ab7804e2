"""Benchmark of the proof-of-path kernel: fused scale_add vs torch's ``alpha * x + y`` (two ops).

Run: ``python -m benchmarks.scale_add [--out DIR]`` (GPU: Triton; CPU: the C++ op).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_rows, row, time_fn, write_results
from hf_efficient.ops import scale_add


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    sizes = [1 << 20, 1 << 24, 1 << 27] if device == "cuda" else [1 << 16, 1 << 22]
    rows = []
    for dtype in dtypes:
        for n in sizes:
            x = torch.randn(n, device=device, dtype=dtype)
            y = torch.randn(n, device=device, dtype=dtype)
            ours = time_fn(lambda: scale_add(x, y, 0.5), device)
            base = time_fn(lambda: 0.5 * x + y, device)
            gbps = 3 * n * x.element_size() / ours / 1e9
            rows.append(row(f"scale_add n={n} {str(dtype)[6:]}", ours, base, "torch 0.5*x+y", GB_s=gbps))
    print_rows(rows)
    write_results(f"scale_add_{device}", rows, {"device": device}, args.out)


if __name__ == "__main__":
    main()
