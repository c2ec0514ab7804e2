"""LUT-based mixed-precision GEMM (LUT Tensor Core ideas, in software on CUDA cores).

Activations are cut into groups of 4; for each group a table holds the partial sums
``T[p] = sum_i x_i * (-1)**bit_i(p)`` for every sign pattern ``p`` (16 patterns, 8 stored: the table is
symmetric, ``T[15 - p] = -T[p]``). The weight side is *bit-serial* over "planes": for a uniform INT
grid a plane is one bit of the code (``bits`` lookups per 4 weights, plus a constant term); for any
other grid (NF, FP, two-scale AFPQ) the planes are the parities ``c & S`` of the grid's Walsh-Hadamard
spectrum (:func:`~hf_efficient.kernels.quant_reference.walsh_terms`), so the same kernel serves
1-4 bits and every value grid. Per quantization group the per-plane sums are combined with the group's
scales (``a``, and ``b`` / ``a*b`` for the second function), so scales cost nothing per element.

Tables are built by one batched matmul before the kernel (shared with the reference). Twin:
:func:`~hf_efficient.kernels.quant_reference.lut_matmul_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import autotune, fixed
from .quant_gemm import SYM, ZERO_POINT, _check, load_params
from .quant_layout import LUT_G, KernelWeight
from .quant_reference import lut_tables_reference, walsh_terms

MAX_LUT_BITS = 4


@triton.jit
def _parity(t):
    t = t ^ (t >> 2)
    return (t ^ (t >> 1)) & 1


@triton.jit
def codes_at(q_ptr, offs_k, offs_n, mask_n, KW, P0W, BITS: tl.constexpr):
    """int32 codes ``[len(offs_k), len(offs_n)]`` gathered from the chunk-interleaved layout."""
    r = offs_k % 32
    chunk = offs_k // 32
    row = q_ptr + offs_n[None, :] * KW
    if BITS == 3:
        wa = tl.load(row + (chunk * 2 + r % 2)[:, None], mask=mask_n[None, :], other=0)
        wb = tl.load(row + (P0W + chunk)[:, None], mask=mask_n[None, :], other=0)
        c = ((wa >> ((r // 2) * 2)[:, None]) & 3) | (((wb >> r[:, None]) & 1) << 2)
    else:
        wa = tl.load(row + (chunk * BITS + r % BITS)[:, None], mask=mask_n[None, :], other=0)
        c = (wa >> ((r // BITS) * BITS)[:, None]) & ((1 << BITS) - 1)
    return c


@autotune("lut")
@triton.jit(do_not_specialize=["M", "N", "P0W", "NG", "GROUP", "M_BUCKET"])  # see quant_gemm.SHAPE_ARGS
def _lut_kernel(tab_ptr, q_ptr, p_ptr, masks_ptr, betas_ptr, out_ptr, M, N, K, KP, KW, P0W, NG, GROUP, M_BUCKET,
                N_TERMS: tl.constexpr, BITS: tl.constexpr, MODE: tl.constexpr, JG: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, JG)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask3 = mask_m[:, None, None] & mask_n[None, None, :]
    J = KP // 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, KP // GROUP):
        kq = g * GROUP + offs_j * 4
        c0 = codes_at(q_ptr, kq, offs_n, mask_n, KW, P0W, BITS)
        c1 = codes_at(q_ptr, kq + 1, offs_n, mask_n, KW, P0W, BITS)
        c2 = codes_at(q_ptr, kq + 2, offs_n, mask_n, KW, P0W, BITS)
        c3 = codes_at(q_ptr, kq + 3, offs_n, mask_n, KW, P0W, BITS)
        a, b = load_params(p_ptr, g, offs_n, mask_n, N, NG)
        tbase = tab_ptr + offs_m[:, None, None] * (J * 8) + (g * JG + offs_j)[None, :, None] * 8
        s1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in tl.static_range(N_TERMS):
            msk = tl.load(masks_ptr + t)
            pat = (_parity(c0 & msk) | (_parity(c1 & msk) << 1) | (_parity(c2 & msk) << 2)
                   | (_parity(c3 & msk) << 3))
            neg = pat >= 8
            look = tl.load(tbase + tl.where(neg, 15 - pat, pat)[None, :, :], mask=mask3, other=0.0)
            part = tl.sum(tl.where(neg[None, :, :], -look, look), axis=1)
            s1 += tl.load(betas_ptr + t) * part
            s2 += tl.load(betas_ptr + N_TERMS + t) * part
        if MODE == SYM:
            acc += s1 * a[None, :]
        elif MODE == ZERO_POINT:
            acc += (s1 + s2 * b[None, :]) * a[None, :]
        else:
            acc += s1 * a[None, :] + s2 * b[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def prepare_lut(kw: KernelWeight) -> KernelWeight:
    """Compute (once) the bit-serial terms of ``kw``'s grid and cache them on ``kw``."""
    if kw.bits > MAX_LUT_BITS:
        raise ValueError(f"the LUT kernel serves bits <= {MAX_LUT_BITS}, got {kw.bits}")
    if kw.lut_masks is None:
        masks, b1, b2 = walsh_terms(kw)
        kw.lut_masks, kw.lut_betas = masks, torch.cat([b1, b2]).contiguous()
    return kw


def quant_lut_gemm(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` through activation tables: ``x`` (M, K) fp16/bf16 -> (M, N) in x's dtype."""
    _check(x, kw)
    prepare_lut(kw)
    m = x.shape[0]
    out = torch.empty(m, kw.N, device=x.device, dtype=torch.float32)
    if m == 0 or kw.N == 0 or kw.K == 0:
        return out.zero_().to(x.dtype)
    tables = lut_tables_reference(x, kw.Kp).contiguous()
    n_terms = kw.lut_masks.numel()
    grid = lambda meta: (triton.cdiv(kw.N, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    launch = fixed(_lut_kernel, "lut", config)(grid) if config else _lut_kernel[grid]
    launch(tables, kw.qweight, kw.params, kw.lut_masks, kw.lut_betas, out, m, kw.N, kw.K, kw.Kp, kw.KW,
           kw.plane0_words, kw.n_groups, kw.group_size, min(triton.next_power_of_2(m), 64), N_TERMS=n_terms, BITS=kw.bits, MODE=kw.mode,
           JG=kw.group_size // LUT_G)
    return out.to(x.dtype)
