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


def solver_only(args) -> None:
    """The GPTQ solver alone on one real decoder layer (its 7 linears, real weights, Hessians from real inputs):
    ours (shared Hessian, row-stacked block GPTQ) vs the column-wise solver per linear, CPU and wall time."""
    import statistics

    from tests.gptq_reference import gptq_quantize_columnwise

    model, tok = load_model(None, dtype=torch.float32)
    layer_idx = args.layer
    layers = api.decoder_layers(model)
    windows = api.calibration_windows(tok, args.calib_samples, args.calib_seqlen, seed=0, source="plays")
    with torch.no_grad():
        hidden, kwargs = api._capture_first_layer_inputs(model, layers, windows, "cpu")
        for layer in list(layers)[:layer_idx]:
            hidden = [api._layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    layer = layers[layer_idx]
    names = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = api._collect_layer_inputs(layer, names, hidden, kwargs, True, 64)
    rows = []
    for fmt_name in args.formats.split(","):
        kind, asym = LABELS[fmt_name]
        cfg = AFPQConfig(bits=4, fmt=kind, asymmetric=asym, group_size=args.group_size, algorithm="gptq")
        times = {"block": [], "columnwise": []}
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for group, acc, sample in groups:
                api._quantize_linears({n: names[n] for n in group}, cfg, acc.H, sample)
            times["block"].append((time.perf_counter() - t0, time.process_time() - c0))
            t0, c0 = time.perf_counter(), time.process_time()
            for group, acc, _ in groups:
                for n in group:
                    gptq_quantize_columnwise(names[n].weight, acc.H, cfg.weight_format, args.group_size)
            times["columnwise"].append((time.perf_counter() - t0, time.process_time() - c0))
        med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
        r = {"format": fmt_name, "algorithm": "gptq solver, one layer", "device": "cpu",
             "seconds": med["block"][0], "cpu_seconds": med["block"][1],
             "baseline_seconds": med["columnwise"][0], "baseline_cpu_seconds": med["columnwise"][1],
             "speedup": med["columnwise"][0] / med["block"][0], "cpu_speedup": med["columnwise"][1] / med["block"][1]}
        rows.append(r)
        print(r, flush=True)
        write_results("gptq_solver_speed", rows, {
            "what": f"GPTQ solver on decoder layer {layer_idx} of the embedded model (q,k,v,o,gate,up,down), "
                    f"Hessians from {args.calib_samples} x {args.calib_seqlen} plays tokens; ours: shared Hessian per "
                    f"input, row-stacked block GPTQ; baseline: column-wise solver per linear; median of "
                    f"{args.repeats}", "threads": torch.get_num_threads(),
            "command": "python -m benchmarks.gptq_speed --solver-only"}, args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--formats", default="int4_asym,nf4_asym")
    ap.add_argument("--baseline-formats", default="int4_asym", help="formats also run with the column-wise solver")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--mofq", action="store_true", help="add a MoFQ (all W4 formats, RTN, output error) row")
    ap.add_argument("--solver-only", action="store_true", help="time the solver alone on one layer (see solver_only)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.solver_only:
        return solver_only(args)

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
