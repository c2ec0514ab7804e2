"""Launch each low-bit GEMV once per candidate config, plus the baselines, for a profiler to read (CUDA).

Meant to run under Nsight Compute on the GPU machine, e.g. (from scripts/gpu.sh's checkout):

    ncu --clock-control none -k 'regex:_gemv_kernel|tinygemm|gemv' --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy python3 scripts/profile_quant.py --shape 8192x28672

With ``--impl mma`` it launches the CUDA mma kernel instead (``quant_mma``, the mma layout of ``--fmt``) at each
``--m`` of a comma list, e.g. ``ncu -k regex:quant_mma_kernel --launch-skip 1 --launch-count 1 --set full``
profiles its second launch at the first M.

Every implementation is called twice (the first call compiles or warms up; both are profiled, so read the
second). The configs are those of ``hf_efficient/kernels/autotune.SPACES['gemv']`` valid for the call (or ``--configs``
indices), launched explicitly so no autotuning launches reach the profiler.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file (under ncu): benchmarks/ importable


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x28672", help="NxK")
    ap.add_argument("--fmt", default="int4_asym")
    ap.add_argument("--m", default="1", help="rows of x (--impl mma: a comma list)")
    ap.add_argument("--impl", choices=["triton", "mma"], default="triton")
    ap.add_argument("--configs", default=None, help="comma-separated indices into the gemv space (default all)")
    ap.add_argument("--no-baselines", action="store_true")
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    if args.impl == "triton" and len(ms) != 1:
        ap.error("--m takes one value for the Triton GEMV (a comma list only with --impl mma)")
    from benchmarks.quant_gemv import GROUP, gemlite_make, kernel_weight, tinygemm
    from hf_efficient.kernels.autotune import space, valid
    from hf_efficient.kernels.quant_gemm import quant_gemv

    n, k = (int(v) for v in args.shape.lower().split("x"))
    if args.impl == "mma":
        from hf_efficient.kernels.quant_mma import quant_mma

        kw = kernel_weight(args.fmt, n, k, GROUP, "cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            print(f"mma {args.fmt} M={m}", flush=True)
            for _ in range(2):
                quant_mma(x, kw)
        torch.cuda.synchronize()
        return
    m = ms[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kw = kernel_weight(args.fmt, n, k, GROUP, "cuda", "triton")
    call = {"M": m, "BITS": kw.bits, "BLOCK_M": 1 << (m - 1).bit_length(), "GROUP": GROUP}
    picked = range(len(space("gemv"))) if args.configs is None else [int(i) for i in args.configs.split(",")]
    for i in picked:
        cfg = space("gemv")[i]
        if valid("gemv", cfg, call):
            print(f"config {i}: {cfg}", flush=True)
            for _ in range(2):
                quant_gemv(x, kw, cfg)
    if not args.no_baselines:
        make, _ = tinygemm(n, k, GROUP)
        fn = make(0)
        for _ in range(2):
            fn(x)
        try:
            lin = gemlite_make(n, k, GROUP)[0](0)
            for _ in range(2):
                lin(x)
        except ImportError as e:
            print(f"gemlite not profiled: {e}")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
