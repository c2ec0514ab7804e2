"""Low-bit weight GEMV/GEMM on the GPU: our kernels vs cuBLAS bf16, torch tinygemm int4, gemlite.

Run: ``python -m benchmarks.quant_gemv [--out DIR] [--quick]`` (CUDA only). For each weight shape (N, K) and
batch M it times cuBLAS bf16 ``F.linear``, ``torch._weight_int4pack_mm`` (tinygemm, int4 g128), gemlite
A16W4 (int4 asym g128, when installed) and ours at group 128: the tensor-core mma kernel
(``torch.ops.hf_efficient.quant_mma``, opt-in: ``force_kernel("mma")``) for INT4/INT3/INT2-asym, AFPQ
FP4/NF4/NF3 (two scales) and NF4-sym, the Triton dequant kernels for INT4 (``ours-triton``; the default for
every format but INT4 at bf16) and INT4's default path at bf16, tinygemm's layout through our op
(``ours-tinygemm``: tinygemm up to M = 16, dequantize + cuBLAS above).
Every cell of the written table comes from this one run.

Timing (honest for memory-bound kernels): every implementation gets ``n`` copies of its weights, enough
that they together exceed 3x the 50 MB L2, and one CUDA graph calls it once per copy in turn, so each call
reads its weights from DRAM, as in a real decode step where the other layers evict them. Time per call =
graph replay time / n (median of replays); launch gaps inside a graph are included for every impl alike.
Effective bandwidth = bytes of packed weights + per-group parameters / time; the device copy bandwidth
(read + write of a 2 GiB ``copy_``, ``do_bench``) is measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import print_rows, time_cuda, write_results

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
BATCHES = [1, 4, 16, 64]
OURS = ["int4_asym", "fp4_asym", "nf4_asym", "nf4_sym", "int3_asym", "nf3_asym", "int2_asym"]
TRITON = ["int4_asym", "nf4_asym", "fp4_asym"]  # Triton: the default layout of every format but INT4 at bf16
SUMMARY = {(4096, 11008), (8192, 28672), (28672, 8192)}  # quant_gemv_summary: these shapes at M = 1, 16, 64
GROUP = 128
L2_BYTES = 50 * 2 ** 20


def kernel_weight(fmt_name, n, k, group, device, layout="mma", dtype=torch.float16):
    """Random codes and fp16 scales (the default scale dtype) of ``fmt_name`` in our ``layout``."""
    from hf_efficient import formats
    from hf_efficient.kernels import quant_layout, quant_mma

    fmt = formats.get_format(fmt_name)
    codes = torch.randint(0, 2 ** fmt.bits, (n, k), device=device, dtype=torch.uint8)
    ng = k // group
    a = (torch.rand(n, ng, device=device) * 0.01 + 1e-3).to(dtype)
    b = torch.randint(0, 2 ** fmt.bits, (n, ng), device=device).to(dtype) if fmt.scheme == "zero_point" else a
    pack = quant_mma.pack if layout == "mma" else quant_layout.repack
    return pack(codes, a, None if fmt.scheme == "sym" else b, fmt.grid, fmt.bits, group,
                fmt.scale_scheme.mode)


def mma_make(w, dequant: bool = False):
    """The mma kernel on ``w``; ``dequant``: instead the mma layout's path above ``MMA_MAX_M`` rows (dequantize the
    layer with Triton, then cuBLAS)."""
    from hf_efficient.kernels.quant_mma import dequantize, quant_mma

    def make(i):
        wi = w if i == 0 else dataclasses.replace(w, qweight=w.qweight.clone(), params=w.params.clone())
        return (lambda x: F.linear(x, dequantize(wi, x.dtype))) if dequant else (lambda x: quant_mma(x, wi))
    return make, w.nbytes()


def triton_make(kw):
    from hf_efficient.quantization.gpu import quant_matmul

    def make(i):
        ki = kw if i == 0 else dataclasses.replace(kw, qweight=kw.qweight.clone(), params=kw.params.clone())
        return lambda x: quant_matmul(x, ki.qweight, ki.params, ki.table, ki.N, ki.K, ki.bits, ki.group_size,
                                      ki.mode, ki.decode, ki.v_off, "auto")
    return make, kw.nbytes()


def tiny_make(n, k, group):
    """Our INT4-asym layer's default CUDA path at bf16: the tinygemm layout through our op (tinygemm up to
    M = 16, dequantize + cuBLAS above), with the fp16 scales it keeps for an exact save."""
    from hf_efficient import formats
    from hf_efficient.kernels import quant_tinygemm

    fmt = formats.get_format("int4_asym")
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    a = (torch.rand(n, k // group, device="cuda") * 0.01 + 1e-3).half()
    b = torch.randint(0, 16, (n, k // group), device="cuda").half()
    w = quant_tinygemm.pack(codes, a, b, fmt.grid, group, fmt.scale_scheme.mode)

    def make(i):
        wi = w if i == 0 else dataclasses.replace(w, qweight=w.qweight.clone(), sz=w.sz.clone())
        return lambda x: quant_tinygemm.matmul(x, wi)
    return make, sum(t.numel() * t.element_size() for t in (w.qweight, w.sz, w.scale))


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(3 * L2_BYTES / nbytes)))


def time_rotating(calls, reps: int = 15) -> tuple[float, str]:
    """Seconds per call of ``calls`` (one per weight copy) replayed in one CUDA graph; falls back to
    ``do_bench`` (L2 flushed) on the first copy if the implementation cannot be captured."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        g.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return time_cuda(calls[0], warmup=5, rep=30), f"do_bench ({type(e).__name__})"
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(calls))
    del g
    return statistics.median(times), f"graph x{len(calls)} copies"


def copy_bandwidth() -> float:
    a = torch.empty(2 ** 30, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), warmup=10, rep=100)
    return 2 * a.numel() * a.element_size() / t


def tinygemm(n, k, group):
    """(make(i) -> fn(x), bytes) of torch's int4 tinygemm for an (N, K) weight."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    sz = torch.rand(k // group, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
    nbytes = packed.numel() * packed.element_size() + sz.numel() * 2

    def make(i):
        p, s = (packed, sz) if i == 0 else (packed.clone(), sz.clone())
        return lambda x: torch._weight_int4pack_mm(x, p, group, s)
    return make, nbytes


def gemlite_make(n, k, group):
    from gemlite import DType, GemLiteLinear

    lin = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                        output_dtype=DType.BF16)
    wq = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // group, device="cuda") * 0.01).to(torch.bfloat16)
    z = torch.full((n, k // group), 8.0, device="cuda", dtype=torch.bfloat16)
    lin.pack(wq, s, z, None)
    nbytes = sum(t.numel() * t.element_size() for t in (lin.W_q, lin.scales, lin.zeros) if torch.is_tensor(t))
    return (lambda i: lin if i == 0 else copy.deepcopy(lin)), nbytes


def chosen_config(impl: str, m: int, n: int, k: int, mma_weight=None) -> str:
    """The configuration our kernel ran (``-`` for baselines; ``mma_weight``: the mma kernel's weight)."""
    if impl.startswith("ours-tinygemm"):
        from hf_efficient.kernels.quant_tinygemm import TINYGEMM_MAX_M

        return "tinygemm" if m <= TINYGEMM_MAX_M else "dequantize + cuBLAS"
    if impl.startswith("ours-dequant"):
        return "dequantize + cuBLAS"
    if impl.startswith("ours-triton"):
        from hf_efficient.kernels import quant_gemm

        kernel = quant_gemm._gemm_kernel if m > quant_gemm.GEMV_MAX_M else quant_gemm._gemv_kernel
        best = getattr(kernel, "best_config", None)
        return " ".join(f"{a}={v}" for a, v in best.all_kwargs().items() if v is not None) if best else "?"
    if impl.startswith("ours"):
        from hf_efficient.kernels.quant_mma import launch_plan

        w = mma_weight
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits, nt = launch_plan(m, w.N, w.K, w.bits, w.group_size, torch.bfloat16, w.tables.shape[0], sms)
        return f"mma splits={splits} tiles/warp={nt}"
    return "-"


def _ratios(rows, copy_bw):
    by = {}
    for r in rows:
        by.setdefault((r["N"], r["K"], r["M"]), {})[r["impl"].split("_")[0]] = r["us"]
    for r in rows:
        base = by[(r["N"], r["K"], r["M"])]
        r["pct_copy_bw"] = 100 * r["weight_GB_s"] * 1e9 / copy_bw
        for key, name in (("cublas", "x_vs_bf16"), ("tinygemm", "x_vs_tinygemm"), ("gemlite", "x_vs_gemlite")):
            if key in base:
                r[name] = base[key] / r["us"]


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return f"{pkg} {version(pkg)}"


def _write(rows, args, copy_bw, gl_reason):
    _ratios(rows, copy_bw)
    settings = {"group_size": GROUP, "dtype": "bfloat16", "copy_bw_TB_s": copy_bw / 1e12,
                "gemlite": gl_reason or _version("gemlite"),
                "timing": "CUDA graph over n weight copies (together > 3x L2), median of 15 replays / n"}
    cols = ["N", "K", "M", "impl", "us", "weight_GB_s", "pct_copy_bw", "x_vs_bf16", "x_vs_tinygemm", "x_vs_gemlite",
            "timing", "config"]
    write_results(args.name or ("quant_gemv_quick" if args.quick else "quant_gemv"), rows, settings, args.out,
                  columns=cols)
    if not (args.quick or args.shapes or args.name or args.batches or args.formats or args.dequant):  # full default
        summary = [r for r in rows if (r["N"], r["K"]) in SUMMARY and r["M"] in (1, 16, 64)]
        write_results("quant_gemv_summary", summary, {**settings, "note": "the rows of quant_gemv.json (same run) "
                      "for the summary shapes at M = 1, 16, 64"}, args.out, columns=cols)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16}, three formats")
    ap.add_argument("--shapes", default=None, help="NxK list, e.g. 8192x28672,28672x8192 (default: all six)")
    ap.add_argument("--name", default=None, help="results file stem (default quant_gemv[_quick])")
    ap.add_argument("--batches", default=None, help="M list, e.g. 1,4 (default 1,4,16,64)")
    ap.add_argument("--formats", default=None, help=f"our formats (default {','.join(OURS)})")
    ap.add_argument("--dequant", action="store_true", help="also time the mma layout's dequantize + cuBLAS path "
                    "(``ours-dequant``, what a layer runs above MMA_MAX_M rows)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv needs CUDA")
    shapes, batches, ours = SHAPES, BATCHES, OURS
    if args.quick:
        shapes, batches, ours = [(4096, 4096), (8192, 28672)], [1, 16], ["int4_asym", "nf4_asym", "int3_asym"]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.formats:
        ours = args.formats.split(",")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth (read+write): {copy_bw / 1e12:.3f} TB/s", flush=True)
    gl_reason = None
    try:
        import gemlite  # noqa: F401
    except Exception as e:  # noqa: BLE001
        gl_reason = f"gemlite not importable: {e!r}"
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        mma_weights = {}  # impl name -> the mma weight it runs (its launch plan goes in the config column)
        impls = {"cublas_bf16": (lambda i, w=w: (lambda x, wi=(w if i == 0 else w.clone()): F.linear(x, wi)),
                                 w.numel() * 2)}
        impls["tinygemm_int4_g128"] = tinygemm(n, k, GROUP)
        if gl_reason is None:
            try:
                impls["gemlite_int4_g128"] = gemlite_make(n, k, GROUP)
            except Exception as e:  # noqa: BLE001
                gl_reason = f"gemlite failed: {e!r}"[:300]
        for f in ours:
            mw = kernel_weight(f, n, k, GROUP, "cuda")
            impls[f"ours_{f}_g{GROUP}"] = mma_make(mw)
            mma_weights[f"ours_{f}_g{GROUP}"] = mw
            if args.dequant:
                impls[f"ours-dequant_{f}_g{GROUP}"] = mma_make(mw, dequant=True)
            if f in TRITON:
                impls[f"ours-triton_{f}_g{GROUP}"] = triton_make(kernel_weight(f, n, k, GROUP, "cuda", "triton"))
            if f == "int4_asym":
                impls[f"ours-tinygemm_{f}_g{GROUP}"] = tiny_make(n, k, GROUP)
        built = {name: [make(i) for i in range(copies_for(nb))] for name, (make, nb) in impls.items()}
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            start = len(rows)
            for name, fns in built.items():
                try:
                    t, how = time_rotating([(lambda f=f: f(x)) for f in fns])
                except Exception as e:  # noqa: BLE001
                    print(f"{name} M={m} failed: {e!r}"[:300], flush=True)
                    if name.startswith("gemlite"):
                        gl_reason = f"gemlite failed at M={m}: {e!r}"[:300]
                    continue
                rows.append(dict(N=n, K=k, M=m, impl=name, us=t * 1e6, weight_GB_s=impls[name][1] / t / 1e9,
                                 timing=how, config=chosen_config(name, m, n, k, mma_weights.get(name))))
            _ratios(rows[start:], copy_bw)
            print_rows(rows[start:])
        del w, impls, built, mma_weights
        torch.cuda.empty_cache()
        _write(rows, args, copy_bw, gl_reason)  # after every shape: a cut-off run still leaves its rows
    print(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; gemlite: {gl_reason or 'ok'}")


if __name__ == "__main__":
    main()
