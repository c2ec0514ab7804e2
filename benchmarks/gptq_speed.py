"""Quantization time of the embedded model: block GPTQ (ours) vs the column-wise GPTQ it replaced, and MoFQ.

Each row quantizes a fresh copy of the same float model on the same calibration windows and scores
held-out perplexity, so a speed-up that changed the result would show. The baseline ("gptq-columnwise") is
the previous solver (tests/gptq_reference.py: one Python iteration per column running encode/decode,
one linear at a time); it runs inside today's calibration loop, which already shares one Hessian among
linears that read the same input, so the ratio is that of the solvers plus the row stacking, not of the
Hessian collection. ``seconds`` is wall time of ``quantize_model`` (calibration forward passes included),
``cpu_seconds`` the process's CPU time over the same span (the fairer figure on a shared machine).

Run: ``python -m benchmarks.gptq_speed [--calib-samples 16 --calib-seqlen 256] [--formats int4_asym,nf4_asym]``.
Writes ``benchmarks/results/gptq_speed.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from benchmarks.common import write_results
from hf_efficient.evaluation import perplexity
from hf_efficient.models import load_model
from hf_efficient.quantization import api
from hf_efficient.quantization.afpq import AFPQConfig
from hf_efficient.quantization.mofq import MoFQConfig

COLUMNS = ["format", "algorithm", "device", "seconds", "cpu_seconds", "ppl_plays", "speedup_vs_columnwise",
           "cpu_speedup_vs_columnwise"]
LABELS = {"int4_asym": ("int", True), "nf4_asym": ("nf", True), "fp4_asym": ("fp", True), "fp4_sym": ("fp", False),
          "nf4_sym": ("nf", False)}


def _columnwise_quantize_linears(linears, config, H, inputs):
    """The replaced solver: each linear on its own, column by column."""
    from tests.gptq_reference import gptq_quantize_columnwise

    out = {}
    for name, lin in linears.items():
        fmt = config.choose_format(name, lin.weight, inputs)
        config.record_choice(name, fmt)
        q = api._new_quant_linear(lin, name, config, fmt)
        codes, params = gptq_quantize_columnwise(lin.weight, H, q.fmt, q.group_size, q.scale_dtype,
                                                 config.act_order, config.damp, name=name)
        q.load_quantized(codes, params)
        out[name] = q
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--formats", default="int4_asym,nf4_asym")
    ap.add_argument("--baseline-formats", default="int4_asym", help="formats also run with the column-wise solver")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--mofq", action="store_true", help="add a MoFQ (all W4 formats, RTN, output error) row")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    base, tok = load_model(None, dtype=torch.float32)
    ids = api.calibration_windows(tok, args.calib_samples, args.calib_seqlen, seed=0, source="plays")
    from hf_efficient.data import token_ids

    held = token_ids(tok, "eval", args.eval_tokens)
    settings = {"model": "SmolLM2-135M-Instruct (embedded)", "calib_windows": args.calib_samples,
                "calib_seqlen": args.calib_seqlen, "calib_source": "plays", "group_size": args.group_size,
                "eval": f"held-out plays, {args.eval_tokens} tokens, context 1024", "threads": torch.get_num_threads(),
                "command": "python -m benchmarks.gptq_speed " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []

    def run(label, fmt_name, algorithm, cfg, columnwise=False):
        model = copy.deepcopy(base)
        saved = api._quantize_linears
        if columnwise:
            api._quantize_linears = _columnwise_quantize_linears
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            api.quantize_model(model, cfg, ids, progress=False)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            api._quantize_linears = saved
        ppl = perplexity(model, held, context=1024, progress=False)
        r = {"format": fmt_name, "algorithm": algorithm, "device": "cpu", "seconds": secs, "cpu_seconds": cpu,
             "ppl_plays": ppl, "label": label}
        if isinstance(cfg, MoFQConfig):
            r["summary"] = cfg.summary()
        rows.append(r)
        print(f"{label:40s} {secs:8.1f} s wall  {cpu:8.1f} s CPU  ppl {ppl:.3f}", flush=True)
        write_results("gptq_speed", rows, settings, args.out, columns=COLUMNS)
        return r

    for f in args.formats.split(","):
        kind, asym = LABELS[f]
        mk = lambda: AFPQConfig(bits=4, fmt=kind, asymmetric=asym, group_size=args.group_size,  # noqa: E731
                                algorithm="gptq", calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
        new = run(f"{f} block GPTQ", f, "gptq", mk())
        if f in args.baseline_formats.split(","):
            old = run(f"{f} column-wise GPTQ (before)", f, "gptq-columnwise", mk(), columnwise=True)
            new["speedup_vs_columnwise"] = old["seconds"] / new["seconds"]
            new["cpu_speedup_vs_columnwise"] = old["cpu_seconds"] / new["cpu_seconds"]
            print(f"  speed-up {new['speedup_vs_columnwise']:.2f}x wall, {new['cpu_speedup_vs_columnwise']:.2f}x CPU; "
                  f"ppl {new['ppl_plays']:.3f} vs {old['ppl_plays']:.3f}")
        run(f"{f} RTN", f, "rtn", AFPQConfig(bits=4, fmt=kind, asymmetric=asym, group_size=args.group_size))
    if args.mofq:
        run("MoFQ-asym W4 RTN (output error)", "mofq-all-w4", "mofq-rtn",
            MoFQConfig(bits=4, group_size=args.group_size, calib_samples=args.calib_samples,
                       calib_seqlen=args.calib_seqlen))
    write_results("gptq_speed", rows, settings, args.out, columns=COLUMNS)


if __name__ == "__main__":
    main()
