"""Plain-torch twins of the quantized matmul kernels (test oracles and CPU fallbacks).

Every function reads the same integers as the kernels (:class:`~hf_efficient.kernels.quant_layout.KernelWeight`),
so a kernel and its reference differ only in arithmetic order and rounding.
"""
from __future__ import annotations

import torch

from .quant_layout import LUT_G, KernelWeight, unpack


def dequantize_reference(kw: KernelWeight) -> torch.Tensor:
    """The ``(N, K)`` float32 weight: the scheme's rule (``formats.decode``) applied to the kernel layout."""
    codes = unpack(kw).long()
    v = kw.table[codes]
    gi = torch.arange(kw.K, device=codes.device) // kw.group_size
    return kw.scheme.apply(v, kw.params[0].float()[:, gi], kw.params[1].float()[:, gi])


def quant_matmul_reference(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``x`` (..., K): float32 arithmetic, rounded once to ``x.dtype``."""
    y = x.float() @ dequantize_reference(kw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# LUT formulation (the algorithm of hf_efficient/kernels/quant_lut.py, in torch)
# ------------------------------------------------------------------------------------------------

def _parity(t: torch.Tensor) -> torch.Tensor:
    t = t ^ (t >> 4)
    t = t ^ (t >> 2)
    return (t ^ (t >> 1)) & 1


def walsh_terms(kw: KernelWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit-serial decomposition of the grid: ``(masks int32 (T,), beta1 (T,), beta2 (T,))``.

    Within a group the weight is ``w(c) = a * f1(v_c) + coef2 * f2(v_c)``, the scheme's split of its rule
    (:meth:`hf_efficient.schemes.Scheme.value_split`: sym f1 = v, f2 = 0; zero point f1 = v, f2 = -1,
    coef2 = a*b; two scales f1 = max(v, 0), f2 = min(v, 0), coef2 = b). Any function of a ``bits``-bit code is a sum over bit masks ``S`` of
    ``beta_S * (-1)**parity(c & S)`` (its Walsh-Hadamard spectrum), so ``sum_k x_k f(c_k)`` is a sum over
    the non-zero terms of table lookups indexed by the parity bits of 4 codes. A uniform INT grid has
    ``bits + 1`` terms (one per bit plane plus the constant) -- classic bit-serial; NF/FP grids have more.
    """
    n = 2 ** kw.bits
    f1, f2 = kw.scheme.value_split(kw.table.double().cpu())
    c = torch.arange(n)
    chi = 1.0 - 2.0 * _parity(c[None, :] & c[:, None]).double()  # chi[S, c]
    beta1, beta2 = chi @ f1 / n, chi @ f2 / n
    keep = (beta1.abs() > 1e-12) | (beta2.abs() > 1e-12)
    masks = c[keep].to(torch.int32)
    dev = kw.table.device
    return masks.to(dev), beta1[keep].float().to(dev), beta2[keep].float().to(dev)


def lut_tables_reference(x: torch.Tensor, kp: int) -> torch.Tensor:
    """Symmetrised tables: ``(M, kp // 4, 8)`` float32, ``T[m, j, p] = sum_i x[m, 4j+i] * (-1)**bit_i(p)``.

    Patterns ``p >= 8`` are not stored: ``T[15 - p] = -T[p]``. ``x`` is zero-padded from K to ``kp``.
    """
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // LUT_G, LUT_G)
    p = torch.arange(8, device=x.device)
    signs = 1.0 - 2.0 * ((p[:, None] >> torch.arange(LUT_G, device=x.device)[None, :]) & 1).float()  # (8, 4)
    return xp @ signs.t()


def lut_matmul_reference(x: torch.Tensor, kw: KernelWeight) -> torch.Tensor:
    """The LUT algorithm in torch: tables, parity patterns, lookups, per-group scale combine. (M, N) fp32."""
    masks, beta1, beta2 = walsh_terms(kw)
    tables = lut_tables_reference(x, kw.Kp)  # (M, J, 8)
    codes = torch.zeros(kw.Kp, kw.N, dtype=torch.int64, device=x.device)
    codes[:kw.K] = unpack(kw).t().long()
    c4 = codes.view(kw.Kp // LUT_G, LUT_G, kw.N)  # (J, 4, N)
    a = kw.params[0].float().t()  # (ng, N)
    b = kw.params[1].float().t()
    coef2 = kw.scheme.second_coef(a, b)
    jpg = kw.group_size // LUT_G
    out = torch.zeros(x.shape[0], kw.N, device=x.device)
    for t in range(len(masks)):
        par = _parity(c4 & int(masks[t]))  # (J, 4, N)
        pat = (par << torch.arange(LUT_G, device=x.device).view(1, LUT_G, 1)).sum(1)  # (J, N)
        neg = pat >= 8
        idx = torch.where(neg, 15 - pat, pat)
        look = tables[:, torch.arange(idx.shape[0], device=x.device)[:, None], idx]  # (M, J, N)
        look = torch.where(neg, -look, look)
        acc = look.view(x.shape[0], -1, jpg, kw.N).sum(2)  # (M, ng, N): per-group sums A_S
        out += (acc * (beta1[t] * a + beta2[t] * coef2)).sum(1)
    return out


# ------------------------------------------------------------------------------------------------
# Random weights and the error bound (tests, GPU fuzz: benchmarks/quant_fuzz.py)
# ------------------------------------------------------------------------------------------------
# Twice the unit roundoff of the output dtype (the kernels round their fp32 result once). On the GPU the
# store rounds to nearest; the Triton interpreter truncates fp32 -> bf16 (< one ulp = 2**-7 relative).
U = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -8}
INTERP_BF16_OUT = 2.0 ** -7
# Absolute output rounding in the subnormal range, twice the worst (half a subnormal step), like U.
ETA = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}


def random_kernel_weight(fmt_name: str, n: int, k: int, group: int, scale_dtype=torch.float16, special=None,
                         seed: int = 0, device="cpu", extreme: float = 1000.0):
    """Random codes/params in the format's scheme -> ``(fmt, codes, KernelWeight)``.

    ``special``: ``"zero"`` (every other group has zero scales) or ``"extreme"`` (first group scaled up by
    ``extreme``, last group down by it)."""
    from .. import formats
    from .quant_layout import repack

    fmt = formats.get_format(fmt_name)
    sch = fmt.scale_scheme
    g = torch.Generator().manual_seed(seed)
    valid_codes = torch.tensor(fmt.valid_codes, dtype=torch.uint8)
    codes = valid_codes[torch.randint(len(valid_codes), (n, k), generator=g)]
    ng = -(-k // group)
    a = torch.rand(n, ng, generator=g) * 0.1 + 1e-3
    b = torch.rand(n, ng, generator=g) * 0.1 + 1e-3
    if sch.offset:  # an integer zero point on the unsigned grid
        b = torch.randint(0, 2 ** fmt.bits, (n, ng), generator=g).float()
    if special == "zero":
        a[:, ::2] = 0
        if not sch.offset:
            b[:, ::2] = 0
    elif special == "extreme":
        a[:, 0] *= extreme
        a[:, -1] /= extreme
        if sch.split_sign:
            b[:, 0] *= extreme
    a, b = a.to(device, scale_dtype), b.to(device, scale_dtype)
    kw = repack(codes.to(device), a, b if len(sch.params) > 1 else None, fmt.grid, fmt.bits, group, sch.mode)
    return fmt, codes, kw


def _lut_term_magnitude(kw: KernelWeight) -> torch.Tensor:
    """``(N, K)`` bound on the magnitude of the terms the LUT kernel sums for one weight:
    ``|coef1| sum|beta1| + |coef2| sum|beta2|`` (see :func:`walsh_terms`)."""
    _, beta1, beta2 = walsh_terms(kw)
    gi = torch.arange(kw.K, device=kw.params.device) // kw.group_size
    a = kw.params[0].float().abs()[:, gi]
    b = kw.params[1].float().abs()[:, gi]
    return a * beta1.abs().sum() + kw.scheme.second_coef(a, b).abs() * beta2.abs().sum()


def compare(y: torch.Tensor, x: torch.Tensor, kw: KernelWeight, u_w: float = 0.0, lut: bool = False,
            interpreted: bool | None = None) -> dict:
    """Kernel output ``y`` vs the float32 reference, against the bound (per output element)

    ``|y - ref| <= u_out |ref| + eta_out + (u_w + 1e-5) sum_k |x_k w_k|
    + [INT fast path] 2**(bits-18) sum_k |x_k| a_k``:
    ``u_out`` the output rounding (:data:`U`), ``eta_out`` its absolute floor where the output is subnormal
    (:data:`ETA`: fp16 rounds results under 6.1e-5 to multiples of 2**-24), ``u_w`` the rounding of the
    dequantized weight to the activation dtype (GEMM), ``1e-5`` float32 summation order over K <= ~4096
    (worst case K * 2**-24), and the last term the uniform-INT GEMV decode
    ``sum_x c = 2**bits (sum_x (1 + c/2**bits) - sum_x)``: both chunk sums carry at most 32 * 2**-24 of
    ``2 sum |x|``, multiplied by ``2**bits`` and the scale ``a``. With ``lut`` (the LUT kernel) the float32
    sums run over the Walsh terms of the grid, which cancel to a small or zero weight only after summation,
    so the summation term scales with the terms (:func:`_lut_term_magnitude`), not with ``|w|``.
    ``interpreted``: whether ``y`` comes from the Triton interpreter, whose bfloat16 outputs truncate (default:
    ``y`` is not on CUDA). Returns ``{"bad": count, "rel": max |err| / sum|x w|, "abs": max |err|, "finite": bool}``.
    """
    from .quant_layout import DECODE_INT

    w = dequantize_reference(kw)
    ref = x.float() @ w.t()
    mag = x.float().abs() @ w.abs().t()
    if interpreted is None:  # CPU outputs come from the Triton interpreter, unless the caller says otherwise
        interpreted = not y.is_cuda
    u = INTERP_BF16_OUT if x.dtype == torch.bfloat16 and interpreted else U[x.dtype]
    tol = u * ref.abs() + ETA[x.dtype] + (u_w + 1e-5) * mag
    if kw.decode == DECODE_INT and not kw.scheme.split_sign:
        gi = torch.arange(kw.K, device=w.device) // kw.group_size
        tol = tol + 2.0 ** (kw.bits - 18) * (x.float().abs() @ kw.params[0].float().abs()[:, gi].t())
    if lut:
        tol = tol + 1e-5 * (x.float().abs() @ _lut_term_magnitude(kw).t())
    err = (y.float() - ref).abs()
    finite = bool(torch.isfinite(y.float()).all())
    return {"bad": int((err > tol).sum()) if finite else err.numel(), "rel": float((err / (mag + 1e-30)).max()),
            "abs": float(err.max()), "finite": finite}


def check_close(y: torch.Tensor, x: torch.Tensor, kw: KernelWeight, u_w: float = 0.0, what: str = "",
                lut: bool = False) -> float:
    """Assert :func:`compare`'s bound (and dtype/shape); returns the worst relative error."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], kw.N), f"{what}: {y.dtype} {tuple(y.shape)}"
    r = compare(y, x, kw, u_w, lut=lut)
    assert r["finite"], f"{what}: non-finite output"
    assert r["bad"] == 0, f"{what}: {r['bad']} elements off the bound, max |err| {r['abs']:.3g}"
    return r["rel"]


FUZZ_FORMATS = ("int4_asym", "int3_asym", "int2_asym", "int8_asym", "int4_sym", "fp4_asym", "fp3_asym", "nf4_asym",
                "nf3_asym", "nf4_sym")


def fuzz(kernel: str, cases: int = 1000, seed: int = 1234, device="cuda", max_failures: int = 5,
         fmt_names=FUZZ_FORMATS, only: int | None = None) -> dict:
    """``cases`` random products through ``kernel`` ("mma", "gemv", "gemm" or "lut"; "mma-emu": the mma kernel's code
    on the CPU under :func:`~hf_efficient.kernels.quant_mma.emulation`, with ``device="cpu"``) checked with
    :func:`compare`.

    Random format (of ``fmt_names``), N in [1, 700], K in [1, 1500] (mostly not multiples of the
    group or block sizes), M (1..8 for the GEMV, up to 100 for the GEMM, 1..9 for the LUT kernel), group
    32/64/128, fp16/bf16, x scaled by 1, 0.01 or (bf16) 30, and a quarter each of zero-scale and
    extreme-scale groups. One fixed config per kernel (the first valid one) keeps compilations few; the
    autotune spaces are covered config by config in the GPU tests. Every case draws its weights and its x from its
    own seeded generators, so ``only=i`` reruns case ``i`` of the same ``seed`` alone. Returns a summary dict, with
    the case behind the worst error relative to ``sum |x w|`` (``worst_case``).
    """
    import random
    import time

    from .. import formats

    if only is not None and not 0 <= only < cases:
        raise ValueError(f"only={only} names no case of {cases}")
    rng = random.Random(seed)
    if kernel in ("mma", "mma-emu"):
        from . import quant_mma

        max_bits = max(quant_mma.MMA_BITS)
        run = quant_mma.quant_mma if kernel == "mma" else quant_mma.quant_mma_emulated

        def fn(x, kw, codes, fmt, config):  # config: the split-K factor (0 = the shape rule)
            w = quant_mma.pack(codes.to(kw.params.device), kw.params[0], kw.params[1], fmt.grid, fmt.bits, kw.group_size,
                               kw.mode)
            return run(x, w, splits=config)
    else:
        from .autotune import space, valid
        from .quant_gemm import quant_gemm, quant_gemv
        from .quant_lut import MAX_LUT_BITS, quant_lut_gemm

        max_bits = MAX_LUT_BITS if kernel == "lut" else 8
        triton_fn = {"gemv": quant_gemv, "gemm": quant_gemm, "lut": quant_lut_gemm}[kernel]

        def fn(x, kw, codes, fmt, config):
            return triton_fn(x, kw, config=config)
    names = [f for f in fmt_names if formats.get_format(f).bits <= max_bits]
    worst_rel, worst_abs, t0, counts, failures, n_bad, worst_case = 0.0, 0.0, time.time(), {}, [], 0, "-"
    for i in range(cases):
        name = rng.choice(names)
        group = rng.choice([32, 64, 128])
        n, k = rng.randint(1, 700), rng.randint(1, 1500)
        dtype = rng.choice([torch.float16, torch.bfloat16])
        m = {"gemv": lambda: rng.choice(range(1, 9)),  # 1..GEMV_MAX_M
             "gemm": lambda: rng.choice([1, 2, 9, 16, 17, 33, 64, 100]),
             "mma": lambda: rng.choice([1, 1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 100, 256]),
             "lut": lambda: rng.randint(1, 9)}[kernel.removesuffix("-emu")]()
        special = rng.choice([None, None, "zero", "extreme"])
        if kernel.startswith("mma"):
            cfg = rng.choice([0, 0, 1, 2, 3, 7])
        x_scale = rng.choice([1.0, 0.01] + ([30.0] if dtype == torch.bfloat16 else []))
        if only is not None and i != only:  # the generator above still draws every case's choices
            continue
        # fp16 tops out at 65504: an INT8 group scaled x1000 times x30 overflows it (in the reference too),
        # so fp16 cases use milder extremes; bf16 takes x1000 / x1e-3 scales and x30 activations.
        fmt, codes, kw = random_kernel_weight(name, n, k, group, special=special, seed=i, device=device,
                                              extreme=1000.0 if dtype == torch.bfloat16 else 10.0)
        if not kernel.startswith("mma"):
            args = {"GROUP": group, "BITS": kw.bits, "M": m, "BLOCK_M": 1 << (m - 1).bit_length()}
            cfg = next(c for c in space(kernel) if valid(kernel, c, args))
        gx = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = torch.randn(m, k, generator=gx).to(device, dtype) * x_scale
        # the GEMM rounds the dequantized weight to the activation dtype, the mma kernel the grid value (and where it
        # scales the A fragments also the scale and the scaled weight: three roundings)
        u_w = U[dtype] if kernel.startswith(("gemm", "mma")) else 0.0
        if kernel.startswith("mma") and quant_mma.scales_fragments(m, dtype == torch.bfloat16, group):
            u_w = (1 + U[dtype]) ** 3 - 1
        r = compare(fn(x, kw, codes, fmt, cfg), x, kw, u_w=u_w,
                    lut=kernel == "lut", interpreted=False if kernel == "mma-emu" else None)
        what = f"case {i}: {name} m={m} n={n} k={k} g={group} {dtype} {special} x*{x_scale} config={cfg}"
        if r["rel"] > worst_rel:
            worst_rel, worst_case = r["rel"], f"{what}: {r}"
        worst_abs = max(worst_abs, r["abs"])
        counts[name] = counts.get(name, 0) + 1
        if r["bad"]:
            n_bad += 1
            if len(failures) < max_failures:
                failures.append(f"{what}: {r}")
    return {"kernel": kernel, "cases": sum(counts.values()), "failed_cases": n_bad, "worst_err_over_sum_abs_xw": worst_rel,
            "max_abs_err": worst_abs, "seconds": time.time() - t0, "per_format": counts, "failures": failures,
            "worst_case": worst_case}
