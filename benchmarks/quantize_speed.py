"""Quantization time of the embedded model: one row per format x algorithm x device (RTN, GPTQ, MoFQ-asym).

Every row quantizes a fresh copy of the same float model with the library defaults (calibration: 16 x 256
tokens, half training plays, half self-generated text; g128; fp16 scales). ``seconds`` is the wall time of
``quantize_model`` (the calibration windows are built once beforehand: the generated half is cached on
disk after its first use, which costs one ``generate`` call); ``cpu_seconds`` is this process's CPU time
over the same span, the fairer figure on a shared machine. GPTQ rows also say where the time went:
``collect_s`` (float forward of each layer with the Hessian hooks), ``solve_s`` (the GPTQ solver, of which
``factor_s`` is the inverse-Hessian Cholesky factor); the rest is the re-run of each quantized layer that
makes the next layer's inputs, and building the QuantLinears. The load average before and after each row
is recorded, and ``cpu_stall_s``: the seconds during the row in which some task on the machine waited for a
CPU (Linux pressure stall information; ~0 on an idle machine). On a CPU shared with other jobs, compare rows
of one run, not runs, and prefer rows with a small stall.

``gptq-e2e`` rows time the whole user call, ``hf_efficient.quantize(None, config)``: model load, calibration
windows (generated text from the cache) and quantization. ``--llama7b`` adds a time-only GPTQ row on a
randomly initialised Llama-2-7B-shaped model (4096 hidden, 11008 MLP, 32 layers; bf16 weights, random
calibration tokens) built directly on the device: its perplexity means nothing, its time is the solver's and
the calibration passes' cost at that size.

Run: ``python -m benchmarks.quantize_speed [--formats int4_asym,...] [--algorithms rtn,gptq,gptq-e2e,mofq-asym]
[--device cpu|cuda] [--threads N] [--llama7b]``; ``--quick`` = int4_asym,nf4_asym with rtn,gptq (the GPU
call). Writes ``benchmarks/results/quantize_speed.{json,md}`` (``--name``/``--out`` to write elsewhere).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import write_results
from hf_efficient import formats
from hf_efficient.models import load_model
from hf_efficient.quantization import api, gptq
from hf_efficient.quantization.afpq import AFPQConfig
from hf_efficient.quantization.mofq import MoFQConfig

COLUMNS = ["format", "algorithm", "device", "seconds", "cpu_seconds", "collect_s", "solve_s", "factor_s",
           "load_before", "load_after", "cpu_stall_s", "layers_chosen", "model"]
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
                      algorithm="gptq" if algorithm.startswith("gptq") else algorithm)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cpu_stall_seconds() -> float | None:
    """Linux pressure-stall total: seconds some runnable task waited for a CPU (None where not available)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(some.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def _timed_row(fmt_name, algorithm, device, run, cfg=None) -> dict:
    load_before, stall0 = os.getloadavg()[0], _cpu_stall_seconds()
    with PhaseTimer() as phases:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        _sync(device)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    stall1 = _cpu_stall_seconds()
    r = {"format": fmt_name, "algorithm": algorithm, "device": device, "seconds": secs, "cpu_seconds": cpu,
         **dict(phases.seconds), "load_before": load_before, "load_after": os.getloadavg()[0],
         "cpu_stall_s": None if stall0 is None or stall1 is None else stall1 - stall0}
    if isinstance(cfg, MoFQConfig):
        r["layers_chosen"] = cfg.summary()
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    return r


def llama7b_row(fmt_name: str, device: str, group_size: int, n_windows: int, seqlen: int) -> dict:
    """GPTQ time on a random Llama-2-7B-shaped model (time only), built in bf16 directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    windows = torch.randint(0, cfg.vocab_size, (n_windows, seqlen), generator=torch.Generator().manual_seed(0))
    qcfg = make_config(fmt_name, "gptq", group_size)
    r = _timed_row(fmt_name, "gptq", device, lambda: api.quantize_model(model, qcfg, windows, progress=False), qcfg)
    r["model"] = f"random Llama-7B shape (32 x 4096/11008, bf16), {n_windows} x {seqlen} random tokens, time only"
    del model
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--algorithms", default="rtn,gptq,mofq-asym",
                    help="rtn, gptq (each format), gptq-e2e (each format: hf_efficient.quantize() end to end), "
                         "mofq-asym (one row per bit width: MoFQ over all its formats, RTN)")
    ap.add_argument("--quick", action="store_true", help="int4_asym,nf4_asym with rtn,gptq (overrides --formats/"
                                                        "--algorithms)")
    ap.add_argument("--llama7b", action="store_true", help="add the time-only GPTQ row of a random 7B-shaped model "
                                                          "(first format; needs ~16 GB of device memory)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="quantize_speed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge-from", default=None,
                    help="a results JSON of this benchmark whose rows of other devices are kept ahead of this run's "
                         "(e.g. the committed CPU rows when the GPU rows are written)")
    args = ap.parse_args(argv)
    if args.quick:
        args.formats, args.algorithms = "int4_asym,nf4_asym", "rtn,gptq"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False

    formats_ = args.formats.split(",")
    algorithms = [a for a in args.algorithms.split(",") if a]  # --algorithms '' --llama7b: the 7B row only
    widths = sorted({formats.get_format(f).bits for f in formats_})
    plan = []  # in the order of --algorithms
    for a in algorithms:
        plan += [(f"w{b}", a) for b in widths] if a == "mofq-asym" else [(f, a) for f in formats_]
    defaults = AFPQConfig(algorithm="gptq")
    base = windows = None
    if plan:
        base, tok = load_model(None, dtype=torch.float32, device=args.device)
        windows = api.calibration_windows(tok, defaults.calib_samples, defaults.calib_seqlen, seed=0,
                                          source=defaults.calib_source, model=base, progress=False)
    settings = {"model": "SmolLM2-135M-Instruct (embedded)", "calib_windows": defaults.calib_samples,
                "calib_seqlen": defaults.calib_seqlen, "calib_source": defaults.calib_source,
                "group_size": args.group_size, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                "command": "python -m benchmarks.quantize_speed " + " ".join(sys.argv[1:] if argv is None else argv)}
    kept = []
    if args.merge_from:
        old = json.loads(Path(args.merge_from).read_text())
        kept = [r for r in old["rows"] if r.get("device") != args.device]
        settings["merged_rows"] = (f"{len(kept)} rows of other devices from {args.merge_from} "
                                   f"({old['environment'].get('device')}, {old['environment'].get('date')}, "
                                   f"settings {old.get('settings')})")
    rows = kept
    for fmt_name, algorithm in plan:
        cfg = make_config(fmt_name, algorithm, args.group_size)
        if algorithm == "gptq-e2e":
            run = lambda: api.quantize(None, cfg, device=args.device, progress=False)  # noqa: E731
        else:
            model = copy.deepcopy(base)
            run = lambda: api.quantize_model(model, cfg, windows if cfg.needs_calibration() else None,  # noqa: E731
                                             progress=False)
        rows.append(_timed_row(fmt_name, algorithm, args.device, run, cfg))
        write_results(args.name, rows, settings, args.out, columns=COLUMNS)
        model = None
    if args.llama7b:
        del base
        rows.append(llama7b_row(formats_[0], args.device, args.group_size, defaults.calib_samples,
                                defaults.calib_seqlen))
        write_results(args.name, rows, settings, args.out, columns=COLUMNS)


if __name__ == "__main__":
    main()
