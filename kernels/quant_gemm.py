"""Dequant-fused Triton kernels for low-bit weights: GEMV (M == 1) and GEMM (M >= 2, tensor cores).

Weights are in the kernel layout of :mod:`hf_efficient.kernels.quant_layout` (codes packed along K,
N contiguous, per-group ``a``/``b`` parameters); activations fp16 or bf16 ``(M, K)``; outputs the
activation dtype. Arithmetic: codes decode to float32 values, scaled in float32; the GEMV multiplies
in float32, the GEMM rounds the dequantized tile to the activation dtype for ``tl.dot`` (fp32
accumulation). Split-K partial sums meet in an fp32 buffer by atomic add. Twin:
:func:`hf_efficient.kernels.quant_reference.quant_matmul_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import autotune, fixed
from .quant_layout import KernelWeight


@triton.jit
def load_codes(q_ptr, offs_k, offs_n, mask_n, N, P0_ROWS, BITS: tl.constexpr):
    """int32 codes [len(offs_k), len(offs_n)] (see quant_layout for the planes)."""
    if BITS == 3:
        w0 = tl.load(q_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        w1 = tl.load(q_ptr + (P0_ROWS + offs_k // 32)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        c = ((w0 >> ((offs_k % 16) * 2)[:, None]) & 3) | (((w1 >> (offs_k % 32)[:, None]) & 1) << 2)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(q_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        c = (w >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)
    return c


@triton.jit
def decode_values(c, t_ptr, v_off, DECODE: tl.constexpr):
    """Grid value (fp32) of each code: table read, ``code + v_off`` (INT) or E2M1 bits via fp16."""
    if DECODE == 0:
        v = tl.load(t_ptr + c)
    elif DECODE == 1:
        v = c.to(tl.float32) + v_off
    else:
        # sign -> fp16 bit 15, exponent+mantissa (3 bits) -> fp16 bits 9..11; the result is the E2M1
        # value times 2**-14 (exponent 0 lands on fp16 subnormals, exactly the E2M1 subnormal 0.5).
        h = ((c & 8) << 12) | ((c & 7) << 9)
        v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return v


@triton.jit
def apply_params(v, a, b, MODE: tl.constexpr):
    """The format's scale rule (formats.decode): sym, zero point, or AFPQ two scales."""
    if MODE == 0:
        w = v * a
    elif MODE == 1:
        w = (v - b) * a
    else:
        w = v * tl.where(v < 0, b, a)
    return w


@triton.jit
def load_params(p_ptr, g, offs_n, mask_n, N):
    a = tl.load(p_ptr + (g * 2) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    b = tl.load(p_ptr + (g * 2 + 1) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    return a, b


@autotune("gemv")
@triton.jit
def _gemv_kernel(x_ptr, q_ptr, p_ptr, t_ptr, out_ptr, N, K, KP, P0_ROWS, GROUP, v_off,
                 BITS: tl.constexpr, MODE: tl.constexpr, DECODE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ITERS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        k0 = (pid_k * ITERS + i) * BLOCK_K
        if k0 < KP:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            c = load_codes(q_ptr, offs_k, offs_n, mask_n, N, P0_ROWS, BITS)
            a, b = load_params(p_ptr, k0 // GROUP, offs_n, mask_n, N)
            w = apply_params(decode_values(c, t_ptr, v_off, DECODE), a[None, :], b[None, :], MODE)
            acc += tl.sum(x[:, None] * w, axis=0)
    if tl.num_programs(1) == 1:
        tl.store(out_ptr + offs_n, acc, mask=mask_n)
    else:
        tl.atomic_add(out_ptr + offs_n, acc, mask=mask_n, sem="relaxed")


@autotune("gemm")
@triton.jit
def _gemm_kernel(x_ptr, q_ptr, p_ptr, t_ptr, out_ptr, M, N, K, KP, P0_ROWS, GROUP, v_off, stride_xm, M_BUCKET,
                 BITS: tl.constexpr, MODE: tl.constexpr, DECODE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    steps = tl.cdiv(KP, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(pid_k * per_split, tl.minimum(steps, (pid_k + 1) * per_split)):
        k0 = s * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        c = load_codes(q_ptr, offs_k, offs_n, mask_n, N, P0_ROWS, BITS)
        a, b = load_params(p_ptr, k0 // GROUP, offs_n, mask_n, N)
        w = apply_params(decode_values(c, t_ptr, v_off, DECODE), a[None, :], b[None, :], MODE)
        acc = tl.dot(x, w.to(x.dtype), acc)
    ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


_DTYPES = (torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, kw: KernelWeight) -> None:
    if x.dim() != 2 or x.shape[1] != kw.K:
        raise ValueError(f"x must be (M, K={kw.K}), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float16 or bfloat16, got {x.dtype}")
    if x.device != kw.qweight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {kw.qweight.device}")


def _common(kw: KernelWeight):
    return (kw.qweight, kw.params, kw.table)


def quant_gemv(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (1, K) fp16/bf16 -> (1, N) in x's dtype. ``config`` bypasses autotuning."""
    _check(x, kw)
    if x.shape[0] != 1:
        raise ValueError(f"quant_gemv takes one row, got M={x.shape[0]} (use quant_gemm)")
    x = x.contiguous()
    out = torch.zeros(1, kw.N, device=x.device, dtype=torch.float32)
    if kw.N == 0 or kw.K == 0:
        return out.to(x.dtype)
    grid = lambda meta: (triton.cdiv(kw.N, meta["BLOCK_N"]), triton.cdiv(kw.Kp, meta["BLOCK_K"] * meta["ITERS"]))  # noqa: E731
    launch = fixed(_gemv_kernel, "gemv", config)(grid) if config else _gemv_kernel[grid]
    launch(x, *_common(kw), out, kw.N, kw.K, kw.Kp, kw.plane0_rows, kw.group_size, kw.v_off,
           BITS=kw.bits, MODE=kw.mode, DECODE=kw.decode)
    return out.to(x.dtype)


def quant_gemm(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 (any M >= 1) -> (M, N) in x's dtype, tensor cores."""
    _check(x, kw)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.zeros(m, kw.N, device=x.device, dtype=torch.float32)
    if m == 0 or kw.N == 0 or kw.K == 0:
        return out.to(x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kw.N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    launch = fixed(_gemm_kernel, "gemm", config)(grid) if config else _gemm_kernel[grid]
    launch(x, *_common(kw), out, m, kw.N, kw.K, kw.Kp, kw.plane0_rows, kw.group_size, kw.v_off, x.stride(0),
           min(triton.next_power_of_2(m), 256), BITS=kw.bits, MODE=kw.mode, DECODE=kw.decode)
    return out.to(x.dtype)
