"""AdamA's fused fold on the GPU: tokens/s and peak memory vs torch AdamW (fused) + accumulation,
and where the optimizer's time goes (profiler breakdown).

Run: ``python -m benchmarks.adama_speed [--out DIR] [--configs embedded,llama-1.4b] [--max-seconds 8]``
(CUDA; ``--quick`` runs tiny shapes on the CPU).

Methods, each on the same random-initialised model (same seed) and the same random tokens (speed
and memory do not depend on the values), fp32 weights, bf16 autocast, micro-batch 4 x 512, N = 8:
``adamw`` (torch AdamW fused, gradient accumulation: the baseline), ``adama`` (fp32 states, Triton
multi-tensor fold per bucket), ``adama-unfused`` (the previous design: per-tensor plain-torch fold at
every gradient, ``impl="per_tensor", bucket_mb=0``), ``adama-bf16`` (bf16 states, stochastic
rounding), ``adama-8bit`` (block-wise 8-bit states, Triton 8-bit fold/update per bucket).
Theoretical memory cut = the bytes AdamA removes (the fp32 gradient buffer, and for low-bit states
the saved state bytes) / AdamW's peak.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.adama_memory import EMBEDDED, LLAMA_1B4, builder
from benchmarks.common import write_results

METHODS = {
    "adamw": None,
    "adama": dict(state_bits=32),
    "adama-unfused": dict(state_bits=32, impl="per_tensor", bucket_mb=0),
    "adama-bf16": dict(state_bits=16),
    "adama-8bit": dict(state_bits=8),
}
CONFIGS = {"embedded": (EMBEDDED, False), "llama-1.4b": (LLAMA_1B4, True)}


def make_opt(method, model, n):
    from hf_efficient.optim import AdamA

    kw = METHODS[method]
    if kw is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    return AdamA(model.parameters(), lr=1e-4, weight_decay=0.0, accumulation_steps=n, **kw)


def run(method, build, batches, n, *, warmup, max_steps, max_seconds, device, profile=0):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build().to(device).train()
    opt = make_opt(method, model, n)
    params = sum(p.numel() for p in model.parameters())

    def step(s):
        for i in range(n):
            ids = batches[(s * n + i) % len(batches)].to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / n
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for s in range(warmup):
        step(s)
    sync()
    t0, done = time.perf_counter(), 0
    while done < max_steps and (done < 2 or time.perf_counter() - t0 < max_seconds):
        step(warmup + done)
        done += 1
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else 8 * params
    breakdown = profile_breakdown(step, warmup + done, device, profile) if profile else None
    tokens = done * n * batches[0].numel()
    return {"method": method, "params_M": params / 1e6, "peak_MB": peak, "tokens_per_s": tokens / seconds,
            "steps_timed": done, "state_MB": state / 2**20, "breakdown": breakdown}


def profile_breakdown(step, s0, device, steps=2):
    """Per optimizer step: wall time, and the CPU and device time inside AdamA's ``adama.fold`` /
    ``adama.update`` profiler ranges, plus the largest ops by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            step(s0 + s)
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    dev = lambda e, k: (getattr(e, k, 0.0) or 0.0) / 1e3 / steps  # noqa: E731 - us total -> ms per step
    out = {"wall_ms": wall * 1e3 / steps, "device_busy_ms": sum(dev(e, "self_device_time_total") for e in events)}
    for e in events:
        if e.key in ("adama.fold", "adama.update"):
            out[e.key] = {"calls": e.count / steps, "cpu_ms": e.cpu_time_total / 1e3 / steps,
                          "device_ms": dev(e, "device_time_total")}
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: -(getattr(e, key, 0.0) or 0.0))[:10]
    out["top"] = [{"op": e.key[:60], "ms": dev(e, key)} for e in top]
    return out


def profile_rows(name, methods, build, batches, n, device, steps) -> list[dict]:
    """Flat rows (one per measured range) of a profiled run of each method."""
    rows = []
    for m in methods:
        r = run(m, build, batches, n, warmup=2, max_steps=1, max_seconds=0.0, device=device, profile=steps)
        b = r["breakdown"]
        print(m, b, flush=True)
        rows.append({"config": name, "method": m, "range": "whole step (wall)", "ms_per_step": b["wall_ms"],
                     "share_of_step": 1.0})
        for k in ("adama.fold", "adama.update"):
            if k in b:
                t = b[k]["device_ms"] if device == "cuda" else b[k]["cpu_ms"]
                rows.append({"config": name, "method": m, "range": f"{k} ({b[k]['calls']:.0f} calls, "
                             f"{'device' if device == 'cuda' else 'cpu'})", "ms_per_step": t,
                             "share_of_step": t / b["wall_ms"]})
                if device == "cuda":
                    rows.append({"config": name, "method": m, "range": f"{k} (host cpu)", "ms_per_step": b[k]["cpu_ms"],
                                 "share_of_step": b[k]["cpu_ms"] / b["wall_ms"]})
        for t in b["top"][:6]:
            rows.append({"config": name, "method": m, "range": f"op {t['op']}", "ms_per_step": t["ms"],
                         "share_of_step": t["ms"] / b["wall_ms"]})
    return rows


def kernel_checks(device) -> dict:
    """The Triton kernels against the plain-torch reference on this device (max abs error / codes differing)."""
    from hf_efficient.kernels import adama_fold, adama_q8, adama_reference
    from hf_efficient.optim import AdamA, lowbit

    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(4096, 577), (3,), (2049,)]
    out = {}
    for sd in (torch.float32, torch.bfloat16):
        grads = [torch.randn(s, device=device, generator=g) for s in shapes]
        ms = [torch.randn(s, device=device, generator=g).to(sd) for s in shapes]
        vs = [torch.rand(s, device=device, generator=g).to(sd) for s in shapes]
        a, b = ([m.clone() for m in ms], [v.clone() for v in vs]), ([m.clone() for m in ms], [v.clone() for v in vs])
        adama_reference.fold_reference(grads, *a, [True, False, True], [1.0] * 3, beta1=0.9, beta2=0.999, n=8)
        adama_fold.fold_triton(grads, *b, [True, False, True], None, beta1=0.9, beta2=0.999, n=8)
        out[f"fold_{sd}"] = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    m0 = torch.randn(1 << 20, device=device, generator=g)
    st = [(lowbit.Q8State.zeros(m0, True, 256), lowbit.Q8State.zeros(m0, False, 256)) for _ in range(2)]
    for m, v in st:
        m.store(m0)
        v.store(m0.abs())
    grad = torch.randn(1 << 20, device=device, generator=g)
    AdamA([torch.nn.Parameter(m0)], impl="per_tensor")._fold_q8({"exp_avg": st[0][0], "exp_avg_sq": st[0][1],
                                                                 "folds": 0}, grad, 0.9, 0.999, 8)
    adama_q8.fold_q8_triton([grad], [st[1][0]], [st[1][1]], [True], None, beta1=0.9, beta2=0.999, n=8,
                            mgrid=lowbit.value_map(True, device), vgrid=lowbit.value_map(False, device))
    out["q8_codes_differing"] = float(sum((x.codes != y.codes).float().mean() for x, y in zip(st[0], st[1])) / 2)
    out["q8_max_code_step"] = int(max((x.codes.int() - y.codes.int()).abs().max() for x, y in zip(st[0], st[1])))
    print("kernel checks:", out, flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default="embedded,llama-1.4b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--big-methods", default="adamw,adama,adama-bf16,adama-8bit",
                    help="methods of the checkpointed 1.4B config (the per-tensor ones are slow there)")
    ap.add_argument("--accumulation", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-seconds", type=float, default=8.0, help="timed seconds per method (>= 2 steps)")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke run)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of timing: profile STEPS steps of adamw, adama and adama-unfused on the first "
                         "config; write "
                         "adama_profile_<device>.{json,md}")
    args = ap.parse_args(argv)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    configs = {"quick": (dict(EMBEDDED, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1024), False)} \
        if args.quick else {k: CONFIGS[k] for k in args.configs.split(",")}
    if args.quick and args.profile:  # the CPU profile: the convergence benchmark's model and batch shape
        configs = {"small (2x128, vocab 8192)": (dict(EMBEDDED, num_hidden_layers=2, hidden_size=128,
                                                      intermediate_size=344, num_attention_heads=4,
                                                      num_key_value_heads=2, vocab_size=8192), False)}
    if args.quick:
        args.batch, args.seq_len, args.accumulation, args.max_steps = (4, 64, 4, 3) if args.profile else (2, 32, 2, 3)
    checks = kernel_checks(device) if device == "cuda" and not args.profile else None
    rows = []
    for name, (cfg, ckpt) in configs.items():
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg["vocab_size"], (args.batch, args.seq_len), generator=g) for _ in range(16)]
        build = builder(cfg, ckpt)
        if args.profile:
            args.configs = name
            rows = profile_rows(name, ["adamw", "adama", "adama-unfused"], build, batches, args.accumulation, device,
                                args.profile)
            write_results(f"adama_profile_{device}", rows, {k: v for k, v in vars(args).items() if k != "out"},
                          args.out, columns=["config", "method", "range", "ms_per_step", "share_of_step"])
            return
        base = None
        for m in (args.big_methods if ckpt else args.methods).split(","):
            r = run(m, build, batches, args.accumulation, warmup=2, max_steps=args.max_steps,
                    max_seconds=args.max_seconds, device=device)
            r["config"] = name + (" (checkpointed)" if ckpt else "")
            if m == "adamw":
                base = r
            if base is not None:
                grad_mb = 4 * r["params_M"] * 1e6 / 2**20
                removed = 0.0 if m == "adamw" else grad_mb + base["state_MB"] - r["state_MB"]
                r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["peak_cut"] = 1 - r["peak_MB"] / base["peak_MB"]
                r["theoretical_cut"] = removed / base["peak_MB"]
                r["share_of_theory"] = r["peak_cut"] / r["theoretical_cut"] if removed else None
            print({k: v for k, v in r.items() if k != "breakdown"}, flush=True)
            rows.append(r)
            write_results("adama_speed" + ("_quick" if args.quick else ""), rows,
                          {**{k: v for k, v in vars(args).items() if k != "out"}, "kernel_checks": checks}, args.out,
                          columns=["config", "method", "params_M", "peak_MB", "peak_cut", "theoretical_cut",
                                   "share_of_theory", "tokens_per_s", "throughput_ratio", "steps_timed", "state_MB"])


if __name__ == "__main__":
    main()
