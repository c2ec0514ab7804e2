"""Triton kernel: weights in the mma layout (:mod:`hf_efficient.kernels.quant_mma`) -> a dense ``(N, K)`` matrix,
for the prompt path of mma layers (dequantize once per call, then cuBLAS). Oracle:
:func:`hf_efficient.kernels.quant_mma.dequantize_reference`.

A program takes ``BLOCK_T`` 16-row tiles of one 128-K block: it reads their chunks (contiguous words, each word
once), unpacks code field ``f = 2 p + e`` of each chunk (pair ``p = 2 s + h``; at 3 bits, bits 3f .. 3f+2 of its
96) by shifts, reorders the fields in registers to the K order ``16 s + 8 h + 2 q + e`` of the layout, loads each
(row, group) parameter once and writes whole rows of the block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import interpreting
from .quant_gemm import apply_params


@triton.jit
def _dequant_kernel(qw_ptr, p_ptr, v_ptr, out_ptr, N, K, KB, NG, GROUP: tl.constexpr, BITS: tl.constexpr,
                    MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    CW: tl.constexpr = BITS                                 # words per chunk (32 codes of BITS bits)
    PER: tl.constexpr = 32 // BITS                          # fields per word (2 and 4 bits: no field straddles words)
    # groups that tile a 128-K block (g16..g128 dividing it, or whole blocks): one parameter load per (row, group);
    # other widths (e.g. g96) straddle blocks: a parameter per (row, column), as the reference does
    TILED: tl.constexpr = (128 % GROUP == 0) or (GROUP % 128 == 0)
    NGB: tl.constexpr = 128 // GROUP if GROUP < 128 and TILED else 1
    kb = tl.program_id(1)
    tile = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, 16)
    q = tl.arange(0, 4)
    chunk = ((tile[:, None, None] * KB + kb) * 16 + r[None, :, None]) * 4 + q[None, None, :]   # [BT, 16, 4]
    live = (tile < (N + 15) // 16)[:, None, None, None]
    base = qw_ptr + chunk[:, :, :, None] * CW
    # each word once, in memory order; its fields by broadcast shifts (a per-field gather of the words re-read
    # every word PER times)
    if BITS == 3:
        # 3-bit field f at bit 3 f of the chunk's 96 bits: f <= 10 from words 0-1 as 64 bits, the rest from words 1-2
        f3 = 3 * tl.arange(0, 32)[None, None, None, :]
        w0 = tl.load(base, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF                          # [BT, 16, 4, 1]
        w1 = tl.load(base + 1, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF
        w2 = tl.load(base + 2, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF
        lo = w0 | (w1 << 32)
        hi = w1 | (w2 << 32)
        c = tl.where(f3 < 32, lo >> f3, hi >> tl.maximum(f3 - 32, 0)) & 7
        c = c.to(tl.int32)
    else:
        words = tl.load(base + tl.arange(0, CW)[None, None, None, :], mask=live, other=0)       # [BT, 16, 4, CW]
        shift = BITS * tl.arange(0, PER)
        c = (words[:, :, :, :, None] >> shift[None, None, None, None, :]) & ((1 << BITS) - 1)  # field w*PER + i
        c = tl.reshape(c, [BLOCK_T, 16, 4, 32])
    # f = 4 s + 2 h + e  ->  K column 16 s + 8 h + 2 q + e
    c = tl.reshape(c, [BLOCK_T * 16, 4, 8, 2, 2])                                              # row q s h e
    c = tl.permute(c, [0, 2, 3, 1, 4])                                                         # row s h q e
    c = tl.reshape(c, [BLOCK_T * 16, NGB, 128 // NGB])
    n = tl.program_id(0) * BLOCK_T * 16 + tl.arange(0, BLOCK_T * 16)
    k = kb * 128 + tl.arange(0, 128)
    nmask = (n < N)[:, None]
    v = tl.load(v_ptr + c)
    if TILED:  # the group parameters once per (row, group), broadcast over the group's columns
        g = (kb * 128) // GROUP + tl.arange(0, NGB)
        pp = p_ptr + (((n[:, None] // 16) * NG + g[None, :]) * 16 + n[:, None] % 16) * 2
        a = tl.load(pp, mask=nmask, other=0.0).to(tl.float32)
        b = tl.load(pp + 1, mask=nmask, other=0.0).to(tl.float32)
        w = tl.reshape(apply_params(v, a[:, :, None], b[:, :, None], MODE), [BLOCK_T * 16, 128])
    else:
        pp = p_ptr + (((n[:, None] // 16) * NG + (k // GROUP)[None, :]) * 16 + n[:, None] % 16) * 2
        a = tl.load(pp, mask=nmask, other=0.0).to(tl.float32)
        b = tl.load(pp + 1, mask=nmask, other=0.0).to(tl.float32)
        w = apply_params(tl.reshape(v, [BLOCK_T * 16, 128]), a, b, MODE)
    tl.store(out_ptr + n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=nmask & (k < K)[None, :])


def dequantize_triton(w, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, K)`` in ``dtype`` from :class:`~hf_efficient.kernels.quant_mma.MmaWeight` ``w``; ``values``: the grid
    as the kernel's fragments hold it (float32, rounded to the activation dtype)."""
    out = torch.empty(w.N, w.K, dtype=dtype, device=w.qweight.device)
    nt, kb = w.qweight.shape[:2]
    bt = 1 if interpreting() else 4
    grid = (triton.cdiv(nt, bt), kb)
    _dequant_kernel[grid](w.qweight, w.params, values, out, w.N, w.K, kb, w.params.shape[1], GROUP=w.group_size,
                          BITS=w.bits, MODE=w.mode, BLOCK_T=bt)
    return out
