"""LUT (T-MAC) CPU kernels: GEMV vs torch fp32 ``linear`` and vs a DRAM-bandwidth bound, all in one run.

Kernel rows: GEMV (M = 1) of 4096x4096 and 4096x11008 (in x out) at 1 and 2 threads, bits 1..4 (INT zero
point; 1-bit through the code-indexed engine with grid {0, 1}) plus NF4/FP4 two-scale rows. The bound is
``bytes the kernel streams (packed codes + per-group coefficients) / streaming read bandwidth``, the bandwidth
measured in the same run (float32 sum over 256 MiB at the same thread count). ``bound_2bit_codes_us`` is the
bound for the 2-bit codes alone (the figure quoted in the issue). llama.cpp columns (optional, when
``llama-cpp-python`` is found): ggml's GEMV for TQ1_0 / TQ2_0 / Q2_K / Q4_0, timed interleaved with ours in the
same run (``benchmarks/llama_cpp_gemv.py``); 2-bit rows compare with the faster of TQ2_0 and Q2_K.
End-to-end decode (ours vs fp32 vs llama.cpp) is ``benchmarks/lut_e2e.py``.

Run: ``python -m benchmarks.lut_cpu [--quick] [--out DIR]``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_rows, time_cpu, write_results
from benchmarks.llama_cpp_gemv import LlamaGemv
from benchmarks.lut_e2e import find_llama_python
from hf_efficient.quantization.lut import kernel as K

# llama.cpp types each of our INT rows is compared with (the best of them for 2 bits).
LLAMA_TYPES = {1: ["TQ1_0"], 2: ["TQ2_0", "Q2_K"], 4: ["Q4_0"]}
NW = 4  # distinct weight matrices per timing, so each GEMV streams its weights from DRAM (L3 is 8 MiB)


def read_bandwidth(threads: int, nbytes: int = 256 << 20) -> float:
    buf = torch.ones(nbytes // 4)
    t = time_cpu(lambda: buf.sum(), repeats=10, threads=threads)
    return nbytes / t


def _weight(kind: str, bits: int, n: int, k: int, group: int, seed: int = 0) -> K.LUTWeight:
    g = torch.Generator().manual_seed(seed)
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


def _time_rotating(ws, x, repeats, threads) -> float:
    """Median seconds per GEMV over a rotation of distinct weights (same protocol as the llama.cpp child)."""
    def run():
        for w in ws:
            w.matmul(x)
    return time_cpu(run, repeats=repeats, threads=threads) / len(ws)


def kernel_rows(shapes, threads_list, cases, group, repeats, llama=None, rounds=3):
    """Ours vs fp32 linear vs DRAM bound (vs llama.cpp when ``llama`` is a LlamaGemv), measured interleaved in
    ``rounds`` rounds; each figure is the minimum of its per-round medians (the least disturbed round)."""
    rows = []
    for threads in threads_list:
        bw = read_bandwidth(threads)
        print(f"threads={threads}: streaming read {bw / 1e9:.1f} GB/s", flush=True)
        for k, n in shapes:
            x = torch.randn(1, k)
            wf = torch.randn(n, k)
            ws = {c: [_weight(c[0], c[1], n, k, group, seed=i) for i in range(NW)] for c in cases}
            ltypes = sorted({t for kind, bits in cases if kind == "int" for t in LLAMA_TYPES.get(bits, [])})
            best: dict = {}
            for _ in range(rounds):
                def keep(key, v):
                    best[key] = min(best.get(key, float("inf")), v)
                keep("fp32", time_cpu(lambda: torch.nn.functional.linear(x, wf), repeats=repeats, threads=threads))
                for c in cases:
                    keep(c, _time_rotating(ws[c], x, repeats, threads))
                for t in ltypes if llama else []:
                    us, _ = llama.time_us(k, n, threads, t, nw=NW, repeats=repeats)
                    keep(t, us / 1e6)
            base = best["fp32"]
            for kind, bits in cases:
                ours, w = best[(kind, bits)], ws[(kind, bits)][0]
                bound = w.nbytes() / bw
                r = {"name": f"gemv {k}x{n} {kind}{bits} g{group}", "threads": threads, "ours_us": ours * 1e6,
                     "fp32_linear_us": base * 1e6, "speedup_vs_fp32": base / ours, "dram_bound_us": bound * 1e6,
                     "ours_over_bound": ours / bound, "bound_2bit_codes_us": n * k / 4 / bw * 1e6,
                     "read_GB_s": bw / 1e9}
                refs = [(best[t], t) for t in LLAMA_TYPES.get(bits, []) if kind == "int" and t in best]
                if refs:
                    t_ref, name = min(refs)
                    r.update(llama_cpp=name, llama_cpp_us=t_ref * 1e6, speedup_vs_llama_cpp=t_ref / ours)
                rows.append(r)
                print_rows([r])
            del wf, ws
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, INT2/INT4 only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-python", default=None, help="interpreter with llama_cpp (default: autodetect)")
    ap.add_argument("--ggml-lib", default=None,
                    help="folder with libggml-base/libggml-cpu .so of a llama.cpp build (then --llama-python, or "
                         "python3, only needs numpy)")
    args = ap.parse_args(argv)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008)]
    cases = [("int", 2), ("int", 4)] if args.quick else \
        [("int", 1), ("int", 2), ("int", 3), ("int", 4), ("two_scale", 4), ("two_scale", 2)]
    py = (args.llama_python or "python3") if args.ggml_lib else find_llama_python(args.llama_python)
    llama = LlamaGemv(py, args.ggml_lib) if py else None
    if llama is None:
        print("llama-cpp-python not found: llama.cpp columns stay empty (see benchmarks/lut_e2e.py)")
    try:
        rows = kernel_rows(shapes, (1, 2), cases, 128, args.repeats, llama, args.rounds)
    finally:
        if llama:
            llama.close()
    settings = {"group_size": 128, "repeats": args.repeats, "rounds": args.rounds, "isa": K.isa(),
                "weights_per_timing": NW, "llama_cpp_python": llama.version if llama else "not found",
                "note": "each figure: min over rounds of the median over repeats; ours and llama.cpp interleaved "
                        "in the same run, each rotating over distinct weight matrices"}
    write_results("lut_cpu_gemv_quick" if args.quick else "lut_cpu_gemv", rows, settings, args.out,
                  columns=["name", "threads", "ours_us", "fp32_linear_us", "speedup_vs_fp32", "dram_bound_us",
                           "ours_over_bound", "bound_2bit_codes_us", "llama_cpp", "llama_cpp_us",
                           "speedup_vs_llama_cpp"])


if __name__ == "__main__":
    main()
