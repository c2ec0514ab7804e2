"""Triton kernel: weights in tinygemm's INT4 layout (:mod:`hf_efficient.kernels.quant_tinygemm`) -> a dense
``(N, K)`` matrix, for the prompt path (dequantize once per call, then cuBLAS). Oracle:
:func:`hf_efficient.kernels.quant_tinygemm.dequantize_reference`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting


@triton.jit
def _dequant_kernel(qw_ptr, sz_ptr, out_ptr, N, K, KS, T: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    mask = (n < N) & (k < K)
    # k = 16 T ks + 32 i + 16 c + 8 a + 2 tk + e ; n = 8 nt + nr ; lane 4 nr + tk ; nibble 4 e + 2 c + a
    ks = k // (16 * T)
    r = k % (16 * T)
    i = r // 32
    c = (r // 16) % 2
    a = (r // 8) % 2
    tk = (r // 2) % 4
    e = r % 2
    word = (((n // 8) * KS + ks) * 32 + (n % 8) * 4 + tk) * (T // 2) + i
    q = (tl.load(qw_ptr + word, mask=mask, other=0) >> (4 * (4 * e + 2 * c + a))) & 15
    g = k // GROUP
    s = tl.load(sz_ptr + (g * N + n) * 2, mask=mask, other=0.0).to(tl.float32)
    zf = tl.load(sz_ptr + (g * N + n) * 2 + 1, mask=mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - 8.0) * s + zf
    tl.store(out_ptr + n * K + k, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(qweight: torch.Tensor, sz: torch.Tensor, n: int, k: int, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    t = qweight.shape[3] * 2
    bn, bk = (8, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequant_kernel[grid](qweight, sz, out, n, k, qweight.shape[1], T=t, GROUP=group_size, BLOCK_N=bn, BLOCK_K=bk)
    return out
