"""Every split-K factor of the mma kernel, timed: the data behind its split model (``quant_mma.choose_splits``).

Run: ``python -m benchmarks.quant_mma_splits [--out DIR] [--case N:K:M:FORMAT ...]`` (CUDA). For each case it
times the kernel at splits 1-8, 11 and 16 (those that leave each split at least two 128-K blocks) and at the
split the model picks, with the timing of ``benchmarks.quant_gemv`` (weights read from DRAM: a CUDA graph over
enough weight copies to exceed 3x the L2). One row per case: the time of every split, the measured best, the
model's pick and its time over the best. ``tests/test_quant_mma.py`` checks the shipped model against the
committed table, so a change to the kernel that moves the best splits shows up there.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.common import print_rows, write_results
from hf_efficient import formats
from benchmarks.quant_gemv import copies_for, kernel_weight, time_rotating

CASES = [(n, k, m, f) for (n, k) in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)] for m in (1, 16)
         for f in ("int4_asym", "nf4_asym")]
CASES += [(28672, 8192, 1, "int4_asym"), (28672, 8192, 1, "nf4_asym"), (28672, 8192, 16, "nf4_asym"),
          (4096, 11008, 1, "int3_asym"), (4096, 11008, 1, "int2_asym"), (4096, 4096, 1, "int2_asym"),
          (11008, 4096, 1, "nf3_asym"), (4096, 11008, 64, "nf4_asym")]
# 64 rows: eight M tiles per CTA and, at bf16 with groups of whole blocks, two weight tiles per warp (round 8)
CASES += [(4096, 4096, 64, "nf4_asym"), (11008, 4096, 64, "int4_asym"), (8192, 28672, 64, "int4_asym"),
          (28672, 8192, 64, "nf4_asym")]
SPLITS = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16)
GROUP = 128


def split_times(n: int, k: int, m: int, fmt: str) -> tuple[dict[int, float], dict]:
    """Seconds per call of the mma kernel at each candidate split, and the launch the kernel plans itself
    (``quant_mma.launch_plan``: the model's split, with IntDecode and the tiles per warp as the kernel runs them)."""
    from hf_efficient.kernels.quant_mma import BLOCK_K, int_decode, launch_plan, quant_mma

    w = kernel_weight(fmt, n, k, GROUP, "cuda")
    ws = [w] + [dataclasses.replace(w, qweight=w.qweight.clone(), params=w.params.clone())
                for _ in range(copies_for(w.nbytes()) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kb = -(-k // BLOCK_K)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pick, nt = launch_plan(m, n, k, w.bits, GROUP, x.dtype, w.tables.shape[0], sms)
    # x is bfloat16: the format's own IntDecode test (the weight packs no bfloat16 table row there)
    plan = {"model_split": pick, "nt": nt, "int_decode": int_decode(formats.get_format(fmt).grid, w.bits, w.mode)}
    cands = sorted({s for s in SPLITS if s == 1 or s <= kb // 2} | {pick})
    return {s: time_rotating([lambda wi=wi, s=s: quant_mma(x, wi, s) for wi in ws])[0] for s in cands}, plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", nargs="*", default=None, help="N:K:M:FORMAT (default: the committed set)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_mma_splits needs CUDA")
    cases = CASES if not args.case else [tuple(int(v) if v.isdigit() else v for v in c.split(":")) for c in args.case]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n, k, m, fmt in cases:
        t, plan = split_times(n, k, m, fmt)
        best = min(t, key=t.get)
        pick = plan["model_split"]
        rows.append({"N": n, "K": k, "M": m, "format": fmt, "bits": formats.get_format(fmt).bits,
                     "int_decode": plan["int_decode"], "nt": plan["nt"],
                     "us_by_split": {str(s): round(v * 1e6, 2) for s, v in t.items()},
                     "best_split": best, "best_us": round(t[best] * 1e6, 2), "model_split": pick,
                     "model_over_best": round(t[pick] / t[best], 4)})
        print_rows([rows[-1]])
    write_results("quant_mma_splits", rows, {"group_size": GROUP, "dtype": "bfloat16", "sms": sms,
                                             "timing": "CUDA graph over weight copies (together > 3x L2), median"},
                  args.out)


if __name__ == "__main__":
    main()
