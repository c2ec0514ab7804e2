"""Prefill on the CPU: a 512-token prompt through the embedded model, quantized rows vs fp32, same run.

Quantized linears take ``lut_gemm``'s prefill path above ``max_lut_rows()`` rows: row blocks of the weight
are dequantized into a cache-sized float buffer and multiplied by torch's float GEMM, so no float copy of a
whole layer (let alone the model) exists. Rows: fp32, LUT INT4 g128, AFPQ FP4 g128 (two-scale, code-indexed
stream). Timings are interleaved (fp32, then each quantized row, ``--rounds`` times) and each figure is the
minimum over rounds of one forward of the whole prompt (``use_cache=True``, as ``generate`` prefills).

Run: ``python -m benchmarks.cpu_prefill [--threads 1 2] [--prompt 512] [--rounds 3] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_rows, write_results


def _time(model, ids, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="cpu_prefill", help="result file name (one per machine kind, e.g. cpu_prefill_xeon)")
    args = ap.parse_args(argv)

    from benchmarks.cpu_threads import cpu_info
    from hf_efficient import AFPQConfig
    from hf_efficient.models import load_model
    from hf_efficient.quantization.lut import LUTConfig

    models = {"fp32": None, "lut-int4-g128": LUTConfig(bits=4, group_size=128),
              "afpq-fp4-g128": AFPQConfig(bits=4, group_size=128, fmt="fp")}
    models = {k: load_model(None, dtype=torch.float32, quantization_config=c)[0].eval() for k, c in models.items()}
    ids = torch.randint(100, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up: layer conversion to the kernel stream, allocator
        _time(m, ids[:, :64], 1)
    rows = []
    for threads in args.threads:
        best = {k: float("inf") for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                best[k] = min(best[k], _time(m, ids, threads))
        for k in models:
            if k == "fp32":
                continue
            r = {"name": f"prefill {args.prompt} tok {k}", "threads": threads, "ours_s": best[k],
                 "fp32_s": best["fp32"], "ours_tok_s": args.prompt / best[k], "fp32_tok_s": args.prompt / best["fp32"],
                 "ratio_vs_fp32": best["fp32"] / best[k]}
            rows.append(r)
            print_rows([r])
    write_results(args.name, rows, {**cpu_info(), "prompt": args.prompt, "rounds": args.rounds,
                                        "note": "min over interleaved rounds of one full-prompt forward"},
                  args.out, columns=["name", "threads", "ours_tok_s", "fp32_tok_s", "ratio_vs_fp32", "ours_s", "fp32_s"])


if __name__ == "__main__":
    main()
