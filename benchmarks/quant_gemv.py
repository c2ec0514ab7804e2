"""Low-bit weight GEMV/GEMM on the GPU: our Triton kernels vs cuBLAS bf16, torch tinygemm int4, gemlite.

Run: ``python -m benchmarks.quant_gemv [--out DIR] [--quick]`` (CUDA only). For each weight shape
(N, K) and batch M, times (``triton.testing.do_bench``: CUDA events, L2 flushed, median) cuBLAS bf16
``F.linear``, ``torch._weight_int4pack_mm`` (tinygemm, int4 g128), gemlite A16W4 (int4 asym g128, when
installed), and ours for INT4/INT3/INT2-asym, AFPQ FP4/NF4/NF3 (two scales) at group 128 through the
shape dispatcher, plus the LUT kernel where it is a candidate. Effective bandwidth = bytes of packed
weights + per-group parameters / time; the device copy bandwidth (read + write of a 2 GiB ``copy_``)
is measured in the same run.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from benchmarks.common import print_rows, time_cuda, write_results

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
BATCHES = [1, 4, 16, 64]
OURS = ["int4_asym", "fp4_asym", "nf4_asym", "nf3_asym", "int3_asym", "int2_asym"]
LUT_FORMATS = ["int2_asym", "int4_asym", "nf3_asym"]
GROUP = 128


def kernel_weight(fmt_name, n, k, group, device, dtype=torch.bfloat16):
    from hf_efficient import formats
    from hf_efficient.kernels.quant_layout import SCHEME_MODE, repack

    fmt = formats.get_format(fmt_name)
    codes = torch.randint(0, 2 ** fmt.bits, (n, k), device=device, dtype=torch.uint8)
    ng = k // group
    a = (torch.rand(n, ng, device=device) * 0.01 + 1e-3).to(dtype)
    b = torch.randint(0, 2 ** fmt.bits, (n, ng), device=device).to(dtype) if fmt.scheme == "zero_point" else a
    return repack(codes, a, None if fmt.scheme == "sym" else b, fmt.grid, fmt.bits, group, SCHEME_MODE[fmt.scheme])


def copy_bandwidth() -> float:
    a = torch.empty(2 ** 30, dtype=torch.int16, device="cuda").random_()
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), warmup=10, rep=100)
    return 2 * a.numel() * a.element_size() / t


def tinygemm(w, group):
    """(fn(x), bytes) of torch's int4 tinygemm for an (N, K) weight; None if unavailable."""
    n, k = w.shape
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w.device)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    sz = torch.rand(k // group, n, 2, device=w.device, dtype=torch.bfloat16) * 0.01
    return (lambda x: torch._weight_int4pack_mm(x, packed, group, sz)), packed.numel() * packed.element_size() + \
        sz.numel() * 2


def gemlite_fn(n, k, group):
    import gemlite
    from gemlite import DType, GemLiteLinear

    lin = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                        output_dtype=DType.BF16)
    wq = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // group, device="cuda") * 0.01).to(torch.bfloat16)
    z = torch.full((n, k // group), 8.0, device="cuda", dtype=torch.bfloat16)
    lin.pack(wq, s, z, None)
    nbytes = sum(t.numel() * t.element_size() for t in (lin.W_q, lin.scales, lin.zeros) if torch.is_tensor(t))
    _ = gemlite
    return lin, nbytes


def _write(rows, args, copy_bw, gl_reason):
    gl_t = {(r["N"], r["K"], r["M"]): r["us"] for r in rows if r["impl"].startswith("gemlite")}
    for r in rows:
        if (r["N"], r["K"], r["M"]) in gl_t:
            r["x_vs_gemlite"] = gl_t[(r["N"], r["K"], r["M"])] / r["us"]
    settings = {"group_size": GROUP, "dtype": "bfloat16", "copy_bw_TB_s": copy_bw / 1e12, "gemlite": gl_reason or "ok",
                "timing": "do_bench_cudagraph median (graph replays, no L2 flush: weights of the large shapes exceed L2)"}
    cols = ["N", "K", "M", "impl", "us", "weight_GB_s", "pct_copy_bw", "x_vs_bf16", "x_vs_tinygemm", "x_vs_gemlite"]
    write_results("quant_gemv_quick" if args.quick else "quant_gemv", rows, settings, args.out, columns=cols)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16}, three formats")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv needs CUDA")
    from hf_efficient.kernels.quant_lut import quant_lut_gemm
    from hf_efficient.quantization.gpu import quant_matmul

    shapes, batches, ours = SHAPES, BATCHES, OURS
    if args.quick:
        shapes, batches, ours = [(4096, 4096), (8192, 28672)], [1, 16], ["int4_asym", "nf4_asym", "nf3_asym"]
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"device copy bandwidth (read+write): {copy_bw / 1e12:.3f} TB/s", flush=True)
    gl_reason = None
    try:
        import gemlite  # noqa: F401
    except Exception as e:  # noqa: BLE001
        gl_reason = f"gemlite not importable: {e!r}"
    rows = []
    # CUDA-graph replays: the first H100 run (results/quant_gemv_h100_run1.log) timed with do_bench measured
    # host launch overhead (tens of us for every impl), not the kernels.
    tm = lambda f: triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") / 1e3  # noqa: E731
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        tg, tg_bytes = tinygemm(w, GROUP)
        gl = None
        if gl_reason is None:
            try:
                gl, gl_bytes = gemlite_fn(n, k, GROUP)
            except Exception as e:  # noqa: BLE001
                gl_reason = f"gemlite failed: {e!r}"[:300]
        kws = {f: kernel_weight(f, n, k, GROUP, "cuda") for f in ours}
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            start = len(rows)
            t_bf16 = tm(lambda: F.linear(x, w))
            t_tg = tm(lambda: tg(x))
            base = dict(N=n, K=k, M=m)

            def add(impl, t, nbytes):
                rows.append({**base, "impl": impl, "us": t * 1e6, "weight_GB_s": nbytes / t / 1e9,
                             "pct_copy_bw": 100 * nbytes / t / copy_bw, "x_vs_bf16": t_bf16 / t,
                             "x_vs_tinygemm": t_tg / t})
            add("cublas_bf16", t_bf16, w.numel() * 2)
            add("tinygemm_int4_g128", t_tg, tg_bytes)
            if gl is not None:
                try:
                    gl(x)
                    add("gemlite_int4_g128", tm(lambda: gl(x)), gl_bytes)
                except Exception as e:  # noqa: BLE001
                    gl_reason = f"gemlite failed at M={m}: {e!r}"[:300]
            for f, kw in kws.items():
                call = lambda: quant_matmul(x, kw.qweight, kw.params, kw.table, kw.table[:0], kw.table[:0], kw.N,  # noqa: E731,B023
                                            kw.K, kw.bits, kw.group_size, kw.mode, kw.decode, kw.v_off, "auto")
                add(f"ours_{f}_g{GROUP}", tm(call), kw.nbytes())
                if f in LUT_FORMATS and m <= 16:
                    add(f"ours_lut_{f}_g{GROUP}", tm(lambda: quant_lut_gemm(x, kw)), kw.nbytes())  # noqa: B023
            print_rows(rows[start:])
        del w, kws, gl
        torch.cuda.empty_cache()
        _write(rows, args, copy_bw, gl_reason)  # after every shape: a cut-off run still leaves its rows
    print(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; gemlite: {gl_reason or 'ok'}")

if __name__ == "__main__":
    main()
