"""LUT (T-MAC) CPU kernels: GEMV vs torch fp32 ``linear`` and vs a DRAM-bandwidth bound, all in one run.

Kernel rows: GEMV (M = 1) of 4096x4096 and 4096x11008 (in x out) at 1 and 2 threads, bits 1..4 (INT zero
point; 1-bit through the code-indexed engine with grid {0, 1}) plus NF4/FP4 two-scale rows. The bound is
``bytes the kernel streams (packed codes + per-group coefficients) / streaming read bandwidth``, the bandwidth
measured in the same run (float32 sum over 256 MiB at the same thread count). ``bound_2bit_codes_us`` is the
bound for the 2-bit codes alone (the figure quoted in the issue).
End-to-end decode (ours vs fp32 vs llama.cpp) is ``benchmarks/lut_e2e.py``.

Run: ``python -m benchmarks.lut_cpu [--quick] [--out DIR]``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_rows, time_cpu, write_results
from hf_efficient.quantization.lut import kernel as K

# llama.cpp figures measured earlier on this machine (issue 6), microseconds, 4096x4096 GEMV, (1, 2) threads.
LLAMA_CPP_US = {"TQ2_0": (354, 190), "Q2_K": (553, 285), "Q4_0": (771, 429), "TQ1_0": (719, 364)}


def read_bandwidth(threads: int, nbytes: int = 256 << 20) -> float:
    buf = torch.ones(nbytes // 4)
    t = time_cpu(lambda: buf.sum(), repeats=10, threads=threads)
    return nbytes / t


def _weight(kind: str, bits: int, n: int, k: int, group: int) -> K.LUTWeight:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    ng = k // group
    if kind == "int" and bits == 1:
        grid, ch = torch.tensor([[0.0, 1.0]]), 1
    elif kind == "int":
        grid, ch = None, 1
    else:
        grid, ch = torch.randn(2, 2 ** bits, generator=g), 2
    coef = torch.rand(n, ng, ch, generator=g) + 0.5
    return K.prepare_spec(codes, bits, group, grid, coef, coef[..., 0] * torch.randint(-15, 16, (n, ng), generator=g))


def kernel_rows(shapes, threads_list, cases, group, repeats):
    rows = []
    for threads in threads_list:
        bw = read_bandwidth(threads)
        print(f"threads={threads}: streaming read {bw / 1e9:.1f} GB/s", flush=True)
        for k, n in shapes:
            x = torch.randn(1, k)
            wf = torch.randn(n, k)
            base = time_cpu(lambda: torch.nn.functional.linear(x, wf), repeats=repeats, threads=threads)
            del wf
            for kind, bits in cases:
                w = _weight(kind, bits, n, k, group)
                ours = time_cpu(lambda: w.matmul(x), repeats=repeats, threads=threads)
                bound = w.nbytes() / bw
                r = {"name": f"gemv {k}x{n} {kind}{bits} g{group}", "threads": threads, "ours_us": ours * 1e6,
                     "fp32_linear_us": base * 1e6, "speedup_vs_fp32": base / ours, "dram_bound_us": bound * 1e6,
                     "ours_over_bound": ours / bound, "bound_2bit_codes_us": n * k / 4 / bw * 1e6,
                     "read_GB_s": bw / 1e9}
                if (k, n) == (4096, 4096):
                    ref = {2: "TQ2_0", 4: "Q4_0", 1: "TQ1_0"}.get(bits) if kind == "int" else None
                    if ref:
                        r["llama_cpp_ref"] = ref
                        r["llama_cpp_ref_us"] = LLAMA_CPP_US[ref][threads - 1]
                        r["speedup_vs_llama_cpp_ref"] = LLAMA_CPP_US[ref][threads - 1] / (ours * 1e6)
                rows.append(r)
                print_rows([r])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, INT2/INT4 only")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008)]
    cases = [("int", 2), ("int", 4)] if args.quick else \
        [("int", 1), ("int", 2), ("int", 3), ("int", 4), ("two_scale", 4), ("two_scale", 2)]
    rows = kernel_rows(shapes, (1, 2), cases, 128, args.repeats)
    settings = {"group_size": 128, "repeats": args.repeats, "isa": K.isa(),
                "note": "llama_cpp_ref_us are figures measured earlier on this machine (issue 6), not in this run"}
    write_results("lut_cpu_gemv", rows, settings, args.out,
                  columns=["name", "threads", "ours_us", "fp32_linear_us", "speedup_vs_fp32", "dram_bound_us",
                           "ours_over_bound", "bound_2bit_codes_us", "llama_cpp_ref", "llama_cpp_ref_us",
                           "speedup_vs_llama_cpp_ref"])


if __name__ == "__main__":
    main()
