"""Triton kernel: weights in tinygemm's INT4 layout (:mod:`hf_efficient.kernels.quant_tinygemm`) -> a dense
``(N, K)`` matrix, for the prompt path (dequantize once per call, then cuBLAS). Oracle:
:func:`hf_efficient.kernels.quant_tinygemm.dequantize_reference`.

A program reads the words of ``BLOCK_NT`` 8-row tiles for one K super-tile (``16 T`` columns) as they lie in
memory, unpacks their nibbles and reorders them in registers to ``(rows, K)``, so both the loads and the
stores are contiguous runs (an element-wise gather of the words ran at a tenth of the copy bandwidth).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting


@triton.jit
def _dequant_kernel(qw_ptr, sz_ptr, out_ptr, N, K, KS, T: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_NT: tl.constexpr):
    HT: tl.constexpr = T // 2
    KT: tl.constexpr = 16 * T                                  # K columns per super-tile
    NGT: tl.constexpr = KT // GROUP if KT > GROUP else 1        # groups per super-tile
    ks = tl.program_id(1)
    nt = tl.program_id(0) * BLOCK_NT + tl.arange(0, BLOCK_NT)
    lane = tl.arange(0, 32)
    i = tl.arange(0, HT)
    words = tl.load(qw_ptr + ((nt[:, None, None] * KS + ks) * 32 + lane[None, :, None]) * HT + i[None, None, :],
                    mask=(nt < N // 8)[:, None, None], other=0)                       # [BNT, 32, HT]
    q = (words[:, :, :, None] >> (4 * tl.arange(0, 8))[None, None, None, :]) & 15     # [BNT, 32, HT, 8]
    # lane = 4 nr + tk, nibble = 4 e + 2 c + a  ->  row 8 nt + nr, column 32 i + 16 c + 8 a + 2 tk + e
    q = tl.reshape(q, [BLOCK_NT, 8, 4, HT, 2, 2, 2])                                   # nt nr tk i e c a
    q = tl.permute(q, [0, 1, 3, 5, 6, 2, 4])                                           # nt nr i c a tk e
    q = tl.reshape(q, [BLOCK_NT * 8, NGT, KT // NGT])
    n = tl.program_id(0) * BLOCK_NT * 8 + tl.arange(0, BLOCK_NT * 8)
    g = (ks * KT) // GROUP + tl.arange(0, NGT)
    sp = sz_ptr + (g[None, :] * N + n[:, None]) * 2
    nmask = (n < N)[:, None]
    s = tl.load(sp, mask=nmask, other=0.0).to(tl.float32)
    zf = tl.load(sp + 1, mask=nmask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - 8.0) * s[:, :, None] + zf[:, :, None]
    w = tl.reshape(w, [BLOCK_NT * 8, KT])
    k = ks * KT + tl.arange(0, KT)
    tl.store(out_ptr + n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=(n < N)[:, None])


def dequantize_triton(qweight: torch.Tensor, sz: torch.Tensor, n: int, k: int, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    t, ks = qweight.shape[3] * 2, qweight.shape[1]
    bnt = 1 if interpreting() else 4
    grid = (triton.cdiv(n // 8, bnt), ks)
    _dequant_kernel[grid](qweight, sz, out, n, k, ks, T=t, GROUP=group_size, BLOCK_NT=bnt)
    return out
