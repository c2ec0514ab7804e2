"""Shared benchmark helpers: timing (GPU and CPU) and result files.

Protocol (see shared DESIGN.md): one run measures ours and the baseline on the same inputs and
records both and their ratio. GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between
runs, median). CPU: fixed thread count, warm-up, median of >= 20 ``perf_counter`` repeats.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def time_cuda(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median seconds per call on the GPU (L2 flushed between calls by do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") / 1e3


@contextmanager
def cpu_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_cpu(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, threads: int | None = None) -> float:
    """Median seconds per call on the CPU over ``repeats`` runs at ``threads`` torch threads."""
    with cpu_threads(threads):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fn(fn: Callable[[], object], device: str | torch.device, **kw) -> float:
    return time_cuda(fn, **kw) if torch.device(device).type == "cuda" else time_cpu(fn, **kw)


def row(name: str, ours_s: float, baseline_s: float, baseline: str, **fields) -> dict:
    """One comparison: times in seconds, ``speedup = baseline / ours`` (> 1 means ours is faster)."""
    return {"name": name, "ours_us": ours_s * 1e6, "baseline": baseline, "baseline_us": baseline_s * 1e6,
            "speedup": baseline_s / ours_s, **fields}


def environment() -> dict:
    from hf_efficient.evaluation import environment as env

    return env()


def write_results(name: str, rows: list[dict], settings: dict | None = None, out_dir: str | Path | None = None,
                  columns: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (environment, settings, rows) and ``<name>.md`` (a table) under ``out_dir``."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"benchmark": name, "environment": env, "settings": settings or {}, "rows": rows}
    jpath = out / f"{name}.json"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    cols = columns or (list(rows[0]) if rows else [])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"# {name}", "", f"device: {env['device']} · date: {env['date']} · torch {env['torch']}"
             + (f" · triton {env['triton']}" if "triton" in env else "") + f" · transformers {env['transformers']}",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    if settings:
        lines += ["", "settings: `" + json.dumps(settings) + "`"]
    mpath = out / f"{name}.md"
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


def child_result(result: dict) -> None:
    """In a child process started by :func:`run_child`: hand ``result`` back to the parent."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(module: str, *args: str, env: dict[str, str] | None = None) -> dict | None:
    """Run ``python -m module *args`` in a fresh process (its own CUDA context, allocator statistics and
    ``torch.compile`` caches; ``env`` adds to this process's environment) and return the dict it passed to
    :func:`child_result`; None (with its stderr printed) if it failed."""
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       env={**os.environ, **env} if env else None)
    res = [line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not res:
        print(f"{module} {' '.join(args)} failed:\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(res[-1])


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
