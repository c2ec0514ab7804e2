"""Energy-aware vs latency-optimal kernel choice, and cost-model search vs exhaustive search (GPU + NVML).

Run: ``python -m benchmarks.energy_autotune [--out DIR]`` on an NVIDIA GPU with NVML bindings;
``python -m benchmarks.energy_autotune --plot TABLE.json PNG`` and ``--analyze TABLE.json`` (CPU) draw energy
vs latency per op and replay the searches on a measured table.

Per op and shape, in one run:
1. exhaustive: every candidate of the op (:mod:`hf_efficient.energy.variants`: three Triton reductions x
   launch configs, cuBLAS) is checked against the fp32 reference and measured once (``--window`` s of
   counter ticks under CUDA-graph replays; weights are several times the L2, so every call reads DRAM);
2. the latency-optimal candidate and the energy-aware choice (least J within 1 + eps of the fastest, for
   eps = 5 % and 3 %) are re-measured ``--repeats`` times, interleaved, with ``--final-window`` s windows:
   these repeats are the reported J/op and latency (mean, and the spread as noise);
3. the cost-model search runs live on the GPU for the second GEMV shape (cold start: the first shape's
   rows), before that shape's exhaustive sweep; :func:`analyze` then replays it on the exhaustive tables
   (every shape, with and without cuBLAS, with the other shapes' rows as prior or none), reporting the
   measurements needed and the exhaustive energy of the search's choice vs the exhaustive optimum.
The exhaustive rows become the shipped table (``table_<gpu>.json`` -> hf_efficient/energy/tables/).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import environment, print_rows, write_results

GEMV_SHAPES = [(28672, 8192), (8192, 28672)]
GEMM_SHAPE = (4096, 8192, 8192)  # (M, N, K): compute-bound, at the power cap
EPS = (0.05, 0.03)


def _precompile(op: str, keys: list[str], workers: int) -> None:
    """Compile every Triton candidate in parallel processes: they fill Triton's disk cache, which the
    main process then hits (launch shapes do not specialize, so small tensors compile the same code)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    chunks = [keys[i::workers] for i in range(workers) if keys[i::workers]]
    t = time.perf_counter()
    try:
        with ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(_compile_worker, [op] * len(chunks), chunks))
    except Exception as e:  # fall back to compiling on first use in this process
        print(f"precompile failed ({e!r}); compiling serially", flush=True)
    print(f"precompile {op}: {len(keys)} candidates in {time.perf_counter() - t:.1f} s", flush=True)


def _compile_worker(op: str, keys: list[str]) -> None:
    from hf_efficient.energy.variants import Candidate, get_op

    spec = get_op(op)
    x = torch.randn(1 if op == "bf16_gemv" else 64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    for k in keys:
        try:
            spec.run(Candidate.from_key(k), x, w)
        except Exception:  # e.g. out of shared memory: the main process rejects it with the reason
            pass
    torch.cuda.synchronize()


def _inputs(m: int, n: int, k: int, device: str):
    # fp16 off the GPU: the Triton interpreter's tl.dot mishandles bf16 (numpy has no bf16)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=g) * k ** -0.5).to(dtype)
    return x, w


def _dry_measure(fn, counter=None, window_s=0.0, warmup_s=0.0):
    """--dry-run only (CPU, no NVML): exercises the benchmark's logic with made-up numbers, writes nothing
    to benchmarks/results unless --out says so; never a result."""
    from hf_efficient.energy.measure import OpEnergy

    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    return OpEnergy(dt * 100.0, dt, 100.0, 0.01, 1, 3, window_s)


MEASURE = None  # measure_op, or _dry_measure under --dry-run


def _sweep(op: str, m: int, n: int, k: int, window: float, counter, prior_rows, cfg, live: bool, device: str):
    from hf_efficient.energy import CostModel
    from hf_efficient.energy.search import Measurement, exhaustive_search, model_search
    from hf_efficient.energy.variants import get_op
    from hf_efficient.kernels.energy_gemv import reference

    spec = get_op(op)
    x, w = _inputs(m, n, k, device)
    ref = reference(x, w).float()
    scale = ref.abs().max().item()
    cands, feats, bad = {}, {}, []
    for c in spec.candidates(m, n, k):
        try:
            y = spec.run(c, x, w).float()
            err = (y - ref).abs().max().item() / scale
        except Exception as e:  # a config the compiler rejects (resources) is not a candidate
            bad.append((c.key, repr(e)[:120]))
            continue
        if not err < 2e-2:
            bad.append((c.key, f"max rel err {err:.3g}"))
            continue
        cands[c.key] = c
        feats[c.key] = spec.features(c, m, n, k)
    cache: dict[str, Measurement] = {}

    def measure(key: str, win: float = window) -> Measurement:
        c = cands[key]
        r = MEASURE(lambda: spec.run(c, x, w), counter, window_s=win, warmup_s=0.15)
        return Measurement(key, r.joules_per_op, r.latency_s, r.noise_rel)

    live_res = None
    if live:  # before the exhaustive sweep, so nothing of this shape leaks into the cold start
        live_res = model_search(list(cands), feats.__getitem__, measure, CostModel(prior_rows), cfg)
    ex = exhaustive_search(list(cands), lambda key: cache.setdefault(key, measure(key)), cfg.eps, progress=True)
    return x, w, spec, cands, feats, cache, ex, live_res, bad


def _replay(keys, feats, table, prior_rows, cfg):
    from hf_efficient.energy import CostModel
    from hf_efficient.energy.search import model_search

    return model_search(keys, feats.__getitem__, table.__getitem__, CostModel(prior_rows), cfg)


def _finals(keys: list[str], measure, repeats: int) -> dict[str, dict]:
    runs: dict[str, list] = {k: [] for k in keys}
    for _ in range(repeats):
        for k in keys:  # interleaved: slow drifts (temperature) hit every candidate alike
            runs[k].append(measure(k))
    out = {}
    for k, ms in runs.items():
        j = [m.joules for m in ms]
        t = [m.latency_s for m in ms]
        out[k] = {"J": statistics.mean(j), "s": statistics.mean(t),
                  "J_spread": (max(j) - min(j)) / statistics.mean(j),
                  "s_spread": (max(t) - min(t)) / statistics.mean(t),
                  "J_noise_tick": statistics.mean(m.noise_rel for m in ms)}
    return out


def run(args) -> None:
    global MEASURE
    from hf_efficient.energy import EnergyTuneConfig, NVMLCounter, measure_op
    from hf_efficient.energy.search import choose
    from hf_efficient.energy.tables import shape_key

    if args.dry_run:
        MEASURE, counter, gpu, device = _dry_measure, None, "dry run", "cpu"
        gemv_shapes, gemm_shape = [(48, 64), (32, 96)], (32, 32, 64)
    else:
        MEASURE, counter, device = measure_op, NVMLCounter(), "cuda"
        gpu = counter.name()
        gemv_shapes, gemm_shape = GEMV_SHAPES, GEMM_SHAPE
    cfg = EnergyTuneConfig(eps=EPS[0], window_s=args.window)
    ops = [("bf16_gemv", 1, n, k) for n, k in gemv_shapes[: args.gemv_shapes]]
    if not args.no_gemm:
        ops.append(("bf16_gemm", *gemm_shape))
    if args.workers > 1 and device == "cuda":
        from hf_efficient.energy.variants import get_op

        for op in sorted({o[0] for o in ops}):
            keys = [c.key for c in get_op(op).candidates(1, 256, 256) if c.impl != "library"]
            _precompile(op, keys, args.workers)
    rows, table_rows, choices, sweeps = [], [], {}, {}
    for op, m, n, k in ops:
        t0 = time.perf_counter()
        prior = [(r["features"], r["joules"], r["latency_s"]) for r in table_rows if r["op"] == op]
        live = op == "bf16_gemv" and (bool(prior) or args.live_cold)
        x, w, spec, cands, feats, cache, ex, live_res, bad = _sweep(op, m, n, k, args.window, counter, prior, cfg,
                                                                      live, device)
        sweeps[(op, m, n, k)] = (feats, cache)
        for key, meas in cache.items():
            table_rows.append({"op": op, "shape": shape_key(m, n, k), "key": key, "features": feats[key],
                               "joules": meas.joules, "latency_s": meas.latency_s, "noise_rel": meas.noise_rel})
        lat_choice = min(cache.values(), key=lambda mm: mm.latency_s)
        e_choices = {eps: choose(list(cache.values()), eps)[0] for eps in EPS}

        def measure(key, c=cands, spec=spec, x=x, w=w):
            from hf_efficient.energy.search import Measurement

            r = MEASURE(lambda: spec.run(c[key], x, w), counter, window_s=args.final_window, warmup_s=0.15)
            return Measurement(key, r.joules_per_op, r.latency_s, r.noise_rel)

        final_keys = list(dict.fromkeys([lat_choice.key] + [e.key for e in e_choices.values()]))
        fin = _finals(final_keys, measure, args.repeats)
        lib = cache.get("library")
        choices.setdefault(op, {})[shape_key(m, n, k)] = {"latency": lat_choice.key, "energy": e_choices[EPS[0]].key}
        for eps in EPS:
            e = e_choices[eps]
            fl, fe = fin[lat_choice.key], fin[e.key]
            row = {"op": op, "shape": f"M={m} N={n} K={k}", "eps": eps, "latency_choice": lat_choice.key,
                   "energy_choice": e.key, "latency_tuned_J": fl["J"], "energy_tuned_J": fe["J"],
                   "energy_saving": 1 - fe["J"] / fl["J"], "latency_tuned_us": fl["s"] * 1e6,
                   "energy_tuned_us": fe["s"] * 1e6, "latency_ratio": fe["s"] / fl["s"],
                   "repeat_spread_J": max(fl["J_spread"], fe["J_spread"]),
                   "tick_noise_J": max(fl["J_noise_tick"], fe["J_noise_tick"]), "repeats": args.repeats,
                   "watts_latency_choice": fl["J"] / fl["s"], "watts_energy_choice": fe["J"] / fe["s"],
                   "library_J": lib.joules if lib else None, "library_us": lib.latency_s * 1e6 if lib else None,
                   "candidates": len(cands), "rejected": len(bad), "exhaustive_measurements": ex.n_measured,
                   "exhaustive_opt_J": ex.choice.joules}
            if live_res is not None and eps == EPS[0]:
                chosen = cache[live_res.choice.key]  # judged on the exhaustive sweep's numbers, like the optimum
                row.update(live_search_measurements=live_res.n_measured, live_search_choice=live_res.choice.key,
                           live_search_gap=chosen.joules / ex.choice.joules - 1,
                           live_search_prior_rows=len(prior))
            rows.append(row)
        print_rows(rows[-len(EPS):])
        if bad:
            print(f"rejected {len(bad)}: {bad[:4]}", flush=True)
        print(f"{op} {m}x{n}x{k}: {time.perf_counter() - t0:.1f} s", flush=True)
        del x, w
        if device == "cuda":
            torch.cuda.empty_cache()
        _write(args, rows, table_rows, choices, gpu)
    _write(args, rows, table_rows, choices, gpu)
    analyze(str(_table_path(args.out, gpu)), args.out)


def _write(args, rows, table_rows, choices, gpu) -> None:
    from hf_efficient.energy.tables import FORMAT_VERSION

    settings = {"window_s": args.window, "final_window_s": args.final_window, "repeats": args.repeats, "eps": EPS,
                "gemv_shapes": GEMV_SHAPES[: args.gemv_shapes], "gemm_shape": None if args.no_gemm else GEMM_SHAPE}
    cols = ["op", "shape", "eps", "latency_tuned_J", "energy_tuned_J", "energy_saving", "latency_tuned_us",
            "energy_tuned_us", "latency_ratio", "repeat_spread_J", "library_J", "library_us", "candidates",
            "exhaustive_measurements", "live_search_measurements", "live_search_gap", "latency_choice",
            "energy_choice"]
    write_results("energy_autotune", rows, settings, args.out, columns=cols)
    table = {"format_version": FORMAT_VERSION, "gpu": gpu, "environment": environment(), "choices": choices,
             "rows": table_rows}
    _table_path(args.out, gpu).write_text(json.dumps(table, indent=1) + "\n")


def _table_path(out: str | None, gpu: str) -> Path:
    """With --out: ``OUT/table_<gpu>.json`` (to copy into the package); without: the shipped table itself."""
    from hf_efficient.energy.tables import TABLE_DIR, slug

    return Path(out, f"table_{slug(gpu)}.json") if out else TABLE_DIR / f"{slug(gpu)}.json"


def analyze(table_json: str, out: str | None) -> list[dict]:
    """Offline, on a measured table: the energy-aware choice and the guided search replayed (each lookup
    stands for one measurement) over two spaces per op and shape: every candidate, and every candidate but
    cuBLAS (the ops we write kernels for, quantized or fused, have no library twin). The numbers are the
    exhaustive sweep's single ``--window`` measurements, not repeats: a saving is real only where it exceeds
    both rows' tick noise. The prior of a replay is the other shapes' rows of the same op and space."""
    from hf_efficient.energy import EnergyTuneConfig
    from hf_efficient.energy.search import Measurement, choose

    table = json.loads(Path(table_json).read_text())
    rows = []
    shapes = list(dict.fromkeys((r["op"], r["shape"]) for r in table["rows"]))
    for space, drop in (("all", None), ("no cuBLAS", "library")):
        for op, shape in shapes:
            keep = lambda r: r["op"] == op and r["key"].split(":")[0] != drop  # noqa: E731
            sel = [r for r in table["rows"] if keep(r) and r["shape"] == shape]
            if len(sel) < 2:
                continue
            cache = {r["key"]: Measurement(r["key"], r["joules"], r["latency_s"], r["noise_rel"]) for r in sel}
            feats = {r["key"]: r["features"] for r in sel}
            prior = [(r["features"], r["joules"], r["latency_s"]) for r in table["rows"]
                     if keep(r) and r["shape"] != shape]
            lat = min(cache.values(), key=lambda m: m.latency_s)
            for eps in EPS:
                cfg = EnergyTuneConfig(eps=eps)
                e, why = choose(list(cache.values()), eps)
                row = {"op": op, "shape": shape, "space": space, "eps": eps, "latency_choice": lat.key,
                       "energy_choice": e.key, "reason": why, "latency_tuned_J": lat.joules,
                       "energy_tuned_J": e.joules, "energy_saving": 1 - e.joules / lat.joules,
                       "latency_ratio": e.latency_s / lat.latency_s, "tick_noise_J": max(lat.noise_rel, e.noise_rel),
                       "candidates": len(cache), "budget": cfg.budget(len(cache))}
                for name, pr in (("replay_cold", []), ("replay_prior", prior)):
                    if name == "replay_prior" and not pr:
                        continue
                    res = _replay(list(cache), feats, cache, pr, cfg)
                    row[f"{name}_measurements"] = res.n_measured
                    row[f"{name}_gap"] = cache[res.choice.key].joules / e.joules - 1
                rows.append(row)
    cols = ["op", "shape", "space", "eps", "latency_tuned_J", "energy_tuned_J", "energy_saving", "latency_ratio",
            "tick_noise_J", "reason", "candidates", "budget", "replay_prior_measurements", "replay_prior_gap",
            "replay_cold_measurements", "replay_cold_gap", "latency_choice", "energy_choice"]
    env = table.get("environment", {})
    settings = {"source": "hf_efficient/energy/tables/" + Path(table_json).name, "measured_on": env.get("device"),
                "measured": env.get("date"), "note": "single exhaustive-sweep windows, no repeats; replays: "
                "model_search with each lookup standing for one measurement"}
    jpath, mpath = write_results("energy_autotune_offline", rows, settings, out, columns=cols)
    md = mpath.read_text().splitlines()
    md[2] = (f"measured on {env.get('device')} ({env.get('date')}, torch {env.get('torch')}, triton "
             f"{env.get('triton')}); this analysis is CPU-only")
    mpath.write_text("\n".join(md) + "\n")
    return rows


def plot(table_json: str, png: str) -> None:
    from hf_efficient.energy.plot import plot_table

    plot_table(json.loads(Path(table_json).read_text()), png)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--window", type=float, default=0.6, help="seconds of ticks per exhaustive measurement")
    ap.add_argument("--final-window", type=float, default=2.0, help="seconds per repeat of the chosen candidates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gemv-shapes", type=int, default=2, help="how many of GEMV_SHAPES to run")
    ap.add_argument("--no-gemm", action="store_true", help="skip the power-capped GEMM control")
    ap.add_argument("--live-cold", action="store_true", help="also run the live search on the first shape")
    ap.add_argument("--workers", type=int, default=12, help="processes compiling the candidates up front")
    ap.add_argument("--dry-run", action="store_true", help="CPU self-check of this script with made-up "
                    "measurements on tiny shapes (Triton interpreter); its output is not a result")
    ap.add_argument("--analyze", metavar="TABLE_JSON", help="only the offline choices and search replays")
    ap.add_argument("--plot", nargs=2, metavar=("TABLE_JSON", "PNG"), help="only draw energy vs latency")
    args = ap.parse_args(argv)
    if args.plot:
        plot(*args.plot)
        return
    if args.analyze:
        print_rows(analyze(args.analyze, args.out))
        return
    run(args)


if __name__ == "__main__":
    main()
