"""Quantization time of the embedded model: one row per format x algorithm x device (RTN, GPTQ, MoFQ-asym).

Every row quantizes a fresh copy of the same float model with the library defaults (calibration: 16 x 256
tokens, half training plays, half self-generated text; g128; fp16 scales). ``seconds`` is the wall time of
``quantize_model`` (the calibration windows are built once beforehand: the generated half is cached on
disk after its first use, which costs one ``generate`` call); ``cpu_seconds`` is this process's CPU time
over the same span, the fairer figure on a shared machine. GPTQ rows also say where the time went:
``collect_s`` (float forward of each layer with the Hessian hooks), ``solve_s`` (the GPTQ solver, of which
``factor_s`` is the inverse-Hessian Cholesky factor); the rest is the re-run of each quantized layer that
makes the next layer's inputs, and building the QuantLinears. The load average before and after each row
is recorded: on a CPU shared with other jobs, compare rows of one run, not runs.

Run: ``python -m benchmarks.quantize_speed [--formats int4_asym,...] [--algorithms rtn,gptq,mofq-asym]
[--device cpu] [--threads N]``. Writes ``benchmarks/results/quantize_speed.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections import defaultdict

import torch

from benchmarks.common import write_results
from hf_efficient import formats
from hf_efficient.models import load_model
from hf_efficient.quantization import api, gptq
from hf_efficient.quantization.afpq import AFPQConfig
from hf_efficient.quantization.mofq import MoFQConfig

COLUMNS = ["format", "algorithm", "device", "seconds", "cpu_seconds", "collect_s", "solve_s", "factor_s",
           "load_before", "load_after", "layers_chosen"]
FORMATS = ("int4_asym", "fp4_asym", "nf4_asym", "int4_sym", "fp4_sym", "nf4_sym")


class PhaseTimer:
    """Wall time spent inside selected module functions while a row runs (patched in, restored after)."""

    # api imports gptq_quantize from its module at each call, and gptq_quantize looks up the factor function
    # in its module: patching the modules' attributes reaches both.
    TARGETS = {"collect_s": (api, "_collect_layer_inputs"), "solve_s": (gptq, "gptq_quantize"),
               "factor_s": (gptq, "_inverse_hessian_cholesky")}

    def __init__(self):
        self.seconds = defaultdict(float)
        self._saved = []

    def __enter__(self):
        for key, (mod, attr) in self.TARGETS.items():
            fn = getattr(mod, attr)
            self._saved.append((mod, attr, fn))
            setattr(mod, attr, self._timed(key, fn))
        return self

    def _timed(self, key, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0
        return timed

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)


def make_config(fmt_name: str, algorithm: str, group_size: int):
    if algorithm == "mofq-asym":  # fmt_name "w4": every format of that width
        return MoFQConfig(bits=int(fmt_name[1:]), group_size=group_size)
    f = formats.get_format(fmt_name)
    return AFPQConfig(bits=f.bits, fmt=f.kind, asymmetric=f.scheme != "sym", group_size=group_size,
                      algorithm=algorithm)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--algorithms", default="rtn,gptq,mofq-asym",
                    help="rtn, gptq (each format), mofq-asym (one row per bit width: MoFQ over all its formats, RTN)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="quantize_speed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False

    base, tok = load_model(None, dtype=torch.float32, device=args.device)
    defaults = AFPQConfig(algorithm="gptq")
    windows = api.calibration_windows(tok, defaults.calib_samples, defaults.calib_seqlen, seed=0,
                                      source=defaults.calib_source, model=base, progress=False)
    settings = {"model": "SmolLM2-135M-Instruct (embedded)", "calib_windows": defaults.calib_samples,
                "calib_seqlen": defaults.calib_seqlen, "calib_source": defaults.calib_source,
                "group_size": args.group_size, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "command": "python -m benchmarks.quantize_speed " + " ".join(sys.argv[1:] if argv is None else argv)}
    formats_ = args.formats.split(",")
    algorithms = args.algorithms.split(",")
    widths = sorted({formats.get_format(f).bits for f in formats_})
    plan = []  # in the order of --algorithms
    for a in algorithms:
        plan += [(f"w{b}", a) for b in widths] if a == "mofq-asym" else [(f, a) for f in formats_]
    rows = []
    for fmt_name, algorithm in plan:
        cfg = make_config(fmt_name, algorithm, args.group_size)
        model = copy.deepcopy(base)
        load_before = os.getloadavg()[0]
        with PhaseTimer() as phases:
            t0, c0 = time.perf_counter(), time.process_time()
            api.quantize_model(model, cfg, windows if cfg.needs_calibration() else None, progress=False)
            if args.device != "cpu":
                torch.cuda.synchronize()
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        r = {"format": fmt_name, "algorithm": algorithm, "device": args.device, "seconds": secs, "cpu_seconds": cpu,
             **{k: v for k, v in phases.seconds.items()}, "load_before": load_before,
             "load_after": os.getloadavg()[0]}
        if isinstance(cfg, MoFQConfig):
            r["layers_chosen"] = cfg.summary()
        rows.append(r)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        write_results(args.name, rows, settings, args.out, columns=COLUMNS)
        del model


if __name__ == "__main__":
    main()
