"""GPU fuzz of the quantized matmul kernels against their float32 reference (issue 14: >= 10,000 cases per kernel).

Run: ``python -m benchmarks.quant_fuzz [--cases 1000] [--seed S] [--out DIR]`` (CUDA). Case generator and error bound:
:func:`hf_efficient.kernels.quant_reference.fuzz` / :func:`~hf_efficient.kernels.quant_reference.compare`.
Writes ``quant_fuzz.{json,md}``: per kernel the cases, failed cases, worst error relative to
``sum_k |x_k w_k|`` and the case behind it, max absolute error, and the first failures. Exits non-zero if any case
failed. ``--case I`` reruns case I of the same ``--seed`` alone (each case's weights and x come from its own seeds).

``--kernels mma-emu`` runs the mma kernel's own code on the CPU under its CUDA emulation
(:func:`hf_efficient.kernels.quant_mma.emulation`; no GPU needed, slow) and writes ``quant_fuzz_emu.{json,md}``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_rows, write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--kernels", default="mma,gemv,gemm")
    ap.add_argument("--formats", default=None, help="comma-separated subset of FUZZ_FORMATS (fewer compilations)")
    ap.add_argument("--seed", type=int, default=1234, help="case generator seed (split a long run over processes)")
    ap.add_argument("--case", type=int, default=None, help="rerun only case I of --seed (the worst_case column names it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kernels = args.kernels.split(",")
    emulated = kernels == ["mma-emu"]
    if "mma-emu" in kernels and not emulated:
        raise SystemExit("--kernels mma-emu runs on its own (its results go to quant_fuzz_emu)")
    if not emulated and not torch.cuda.is_available():
        raise SystemExit("quant_fuzz needs CUDA (or --kernels mma-emu)")
    from hf_efficient.kernels.quant_reference import FUZZ_FORMATS, fuzz

    names = tuple(args.formats.split(",")) if args.formats else FUZZ_FORMATS
    rows = []
    for kernel in kernels:
        r = fuzz(kernel, cases=args.cases, seed=args.seed, fmt_names=names, device="cpu" if emulated else "cuda",
                 only=args.case)
        r["failures"] = " | ".join(r["failures"]) or "-"
        r["per_format"] = ", ".join(f"{k}:{v}" for k, v in sorted(r["per_format"].items()))
        rows.append(r)
        print_rows([r])
        write_results("quant_fuzz_emu" if emulated else "quant_fuzz", rows,
                      {"bound": "see kernels/quant_reference.compare", "seed": args.seed, "formats": list(names)},
                      args.out,
                      columns=["kernel", "cases", "failed_cases", "worst_err_over_sum_abs_xw", "max_abs_err",
                               "seconds", "per_format", "worst_case", "failures"])
    if any(r["failed_cases"] for r in rows):
        raise SystemExit("fuzz failures")


if __name__ == "__main__":
    main()
