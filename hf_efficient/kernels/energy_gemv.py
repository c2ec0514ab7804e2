"""bf16/fp16 dense GEMV and GEMM variants that differ in implementation, not only in launch parameters.

The energy tuner (:mod:`hf_efficient.energy`) chooses among them: on a memory-bound GEMV the spread of
energy per call lives mostly in how the kernel reduces (one fp32 partial sum per row, a 2-D register
accumulator reduced once at the end, or tensor cores with the activation padded to 16 rows), while
launch parameters of one implementation move it little. All compute ``y = x @ W.T`` with ``x`` (M, K)
and ``W`` (N, K) row-major, fp32 accumulation, output in x's dtype; ``reference`` is the oracle.

Variants (``IMPLS``):
- ``acc1d``: program = BLOCK_N rows x one activation row; each K step reduces its tile to BLOCK_N sums.
- ``acc2d``: same tiling, a [BLOCK_N, BLOCK_K] fp32 accumulator, one reduction after the K loop.
- ``dot``:   tl.dot on [16, BLOCK_K] x [BLOCK_K, BLOCK_N]; activation rows beyond M are masked to zero,
             so one program serves up to 16 rows (M <= 16) and reads W once for all of them.
``gemm`` is a plain tiled tensor-core GEMM for large M (the power-capped control of the tuner).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

IMPLS = ("acc1d", "acc2d", "dot")
_META: dict[tuple, dict] = {}
DOT_MAX_M = 16
_SHAPE = ["M", "N", "K", "stride_x", "stride_w", "stride_y"]


@triton.jit(do_not_specialize=_SHAPE)
def _gemv_rows_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    if ACC2D:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + m * stride_x + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if ACC2D:
            acc2 += w * x[None, :]
        else:
            acc += tl.sum(w * x[None, :], axis=1)
    if ACC2D:
        acc = tl.sum(acc2, axis=1)
    tl.store(y_ptr + m * stride_y + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit(do_not_specialize=_SHAPE)
def _gemv_dot_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N] read straight from row-major W (no transpose copy)
        wt = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * stride_w + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, wt, acc)
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=_SHAPE)
def _gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # grouped tile order: GROUP_M row tiles share the W tiles they read while those are still in L2
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * stride_w + offs_k[:, None],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, wt, acc)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in fp32, cast to x's dtype: the oracle every variant is tested against."""
    return (x.float() @ w.float().T).to(x.dtype)


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x must be (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but w has K={w.shape[1]}")
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x and w must share a float16/bfloat16/float32 dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}")


def _pow2(name: str, v: int) -> None:
    if v < 1 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two, got {v}")


def gemv(x: torch.Tensor, w: torch.Tensor, impl: str = "acc1d", BLOCK_N: int = 16, BLOCK_K: int = 512,
         num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """``x @ w.T`` for ``x`` (M, K), ``w`` (N, K) row-major -> (M, N) in x's dtype, by variant ``impl``.

    ``acc1d``/``acc2d`` take any M (each activation row re-reads W: meant for M = 1); ``dot`` takes
    M <= 16 and BLOCK_N, BLOCK_K >= 16. Raises ValueError naming the bad argument."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check(x, w)
    _pow2("BLOCK_N", BLOCK_N)
    _pow2("BLOCK_K", BLOCK_K)
    m, n = x.shape[0], w.shape[0]
    if impl == "dot" and (m > DOT_MAX_M or BLOCK_N < 16 or BLOCK_K < 16):
        raise ValueError(f"impl='dot' needs M <= {DOT_MAX_M} and BLOCK_N, BLOCK_K >= 16, got M={m}, "
                         f"BLOCK_N={BLOCK_N}, BLOCK_K={BLOCK_K}")
    x = x.contiguous()
    w = w.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if x.shape[1] == 0:
        return y.zero_()
    args = (x, w, y, m, n, x.shape[1], x.stride(0), w.stride(0), y.stride(0))
    if impl == "dot":
        compiled = _gemv_dot_kernel[(triton.cdiv(n, BLOCK_N),)](*args, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                                 num_warps=num_warps, num_stages=num_stages)
    else:
        compiled = _gemv_rows_kernel[(triton.cdiv(n, BLOCK_N), m)](*args, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                                     ACC2D=impl == "acc2d", num_warps=num_warps,
                                                                     num_stages=num_stages)
    if x.is_cuda:
        _record((impl, *sorted(dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps,
                                    num_stages=num_stages).items())), compiled)
    return y


def gemm(x: torch.Tensor, w: torch.Tensor, BLOCK_M: int = 128, BLOCK_N: int = 128, BLOCK_K: int = 64,
         GROUP_M: int = 8, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """``x @ w.T`` for ``x`` (M, K), ``w`` (N, K) -> (M, N), tiled tensor-core GEMM (tiles >= 16)."""
    _check(x, w)
    for name, v in (("BLOCK_M", BLOCK_M), ("BLOCK_N", BLOCK_N), ("BLOCK_K", BLOCK_K)):
        _pow2(name, v)
        if v < 16:
            raise ValueError(f"{name} must be >= 16 for tl.dot, got {v}")
    if GROUP_M < 1:
        raise ValueError(f"GROUP_M must be >= 1, got {GROUP_M}")
    x = x.contiguous()
    w = w.contiguous()
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    if x.shape[1] == 0:
        return y.zero_()
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    compiled = _gemm_kernel[grid](x, w, y, m, n, x.shape[1], x.stride(0), w.stride(0), y.stride(0),
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                  num_warps=num_warps, num_stages=num_stages)
    if x.is_cuda:
        _record(("gemm", *sorted(dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                                      num_warps=num_warps, num_stages=num_stages).items())), compiled)
    return y


def _record(key: tuple, compiled) -> None:
    """Keep what the compiler decided for a launch config: the cost model's register/shared-memory features."""
    if key in _META or compiled is None:
        return
    try:
        _META[key] = {"n_regs": int(compiled.n_regs), "n_spills": int(compiled.n_spills),
                      "shared": int(compiled.metadata.shared)}
    except Exception:  # attribute layout differs across Triton versions: the features then fall back
        _META[key] = {}


def compiled_metadata(impl: str, **config) -> dict:
    """``n_regs``, ``n_spills`` and ``shared`` (bytes) of the kernel compiled for ``impl`` and launch
    ``config`` (the keyword arguments given to :func:`gemv`/:func:`gemm`), after it has run once on a GPU;
    ``{}`` before that and under the interpreter."""
    return dict(_META.get((impl, *sorted(config.items())), {}))
