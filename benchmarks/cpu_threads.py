"""LUT GEMV thread scaling on one CPU: ours (INT2/INT4 g128) vs torch fp32 ``linear`` at 1..N threads.

Shapes 4096x4096 and 4096x11008 (in x out), M = 1. Every timing rotates over enough distinct weight copies to
fill twice the last-level cache (as ``benchmarks/lut_cpu.py``), so weights stream from DRAM as in decode.
Each row records the CPU model, cache sizes, ISA flags and the LUT engine that ran (``cpu_info``), because
the same code takes different engines on different machines. Built for a one-off run on the GPU machine's
16-core CPU (``--threads 1 2 4 8 16``); llama.cpp is not part of this one (``lut_cpu.py`` has it).

Run: ``python -m benchmarks.cpu_threads [--threads 1 2 4 8 16] [--quick] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from benchmarks.common import print_rows, time_cpu, write_results
from benchmarks.lut_cpu import _copies, _time_rotating, _weight, copies_for, llc_bytes, read_bandwidth
from hf_efficient.kernels import lut_cpu as K


def cpu_info() -> dict:
    """CPU model, cache sizes (sysfs), SIMD flags, the LUT engine and the load: recorded beside CPU results."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            lvl, typ = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            caches[f"L{lvl}{'d' if typ == 'Data' else 'i' if typ == 'Instruction' else ''}"] = (d / "size").read_text().strip()
        except OSError:
            continue
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
                        "avx512_bf16", "amx_tile", "asimd") if f in flags]
    # The 1-minute load average: on a shared machine it says whether the timings can be trusted.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "caches": caches, "simd": simd,
            "lut_engine": K.isa() if K.available() else "not built", "load_avg_1min": load}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    info = cpu_info()
    print(info, flush=True)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008)]
    rows = []
    for k, n in shapes:
        x = torch.randn(1, k)
        w0 = torch.randn(n, k)
        wfs = [w0] + [w0.clone() for _ in range(copies_for(w0.numel() * 4) - 1)]
        ws = {b: _copies(_weight("int", b, n, k, 128)) for b in (2, 4)}
        for threads in args.threads:
            bw = read_bandwidth(threads)
            base = _time_rotating(wfs, x, args.repeats, threads, fn=torch.nn.functional.linear)
            for bits, wl in ws.items():
                ours = _time_rotating(wl, x, args.repeats, threads)
                r = {"name": f"gemv {k}x{n} int{bits} g128", "threads": threads, "ours_us": ours * 1e6,
                     "fp32_linear_us": base * 1e6, "speedup_vs_fp32": base / ours,
                     "dram_bound_us": wl[0].nbytes() / bw * 1e6, "ours_over_bound": ours / (wl[0].nbytes() / bw),
                     "read_GB_s": bw / 1e9, "engine": info["lut_engine"], "cpu": info["cpu"]}
                rows.append(r)
                print_rows([r])
        del wfs, ws
    settings = {**info, "repeats": args.repeats, "llc_bytes": llc_bytes(),
                "note": "median over repeats; every timing rotates over distinct weights filling 2 x LLC"}
    write_results("cpu_threads", rows, settings, args.out,
                  columns=["name", "threads", "ours_us", "fp32_linear_us", "speedup_vs_fp32", "dram_bound_us",
                           "ours_over_bound", "read_GB_s", "engine", "cpu"])


if __name__ == "__main__":
    main()
