"""INT4 weights in the layout of torch's tinygemm kernel (``aten._weight_int4pack_mm``, CUDA, bf16).

Issue 14, point 4: where a maintained kernel runs one of our formats faster than ours, dispatch to it until ours
wins. torch's tinygemm runs uniform INT4 with a float zero per group, ``w = (q - 8) * s + zf``; our INT4 codes
decode as ``w = (q + v_off - b) * a`` (``b`` the integer zero point, or ``b = 0`` for the symmetric grid), so
``s = a`` and ``zf = (8 + v_off - b) * a``, both rounded once to bfloat16.

**The layout** (what ``aten._convert_weight_to_int4pack`` builds on CUDA, built here with plain torch so it can
be made and checked on any device): ``qweight`` int32 ``(N/8, K/(16 T), 32, T/2)`` for ``T`` inner k-tiles (8, 4
or 2: the largest that divides ``K / 16``). Word ``[nt, ks, t, i]`` holds the 8 codes of row
``n = 8 nt + t // 4`` at ``k = 16 T ks + 32 i + 16 c + 8 a + 2 (t % 4) + e`` in nibble ``4 e + 2 c + a``
(the K pairs of an m16n8k16 B fragment). ``sz`` bfloat16 ``(K/group, N, 2)``: ``[..., 0] = s``,
``[..., 1] = zf``.

**Exact round trip.** A layer holds only this layout, so saving must rebuild its stored codes and parameters
bit for bit: codes come back from the nibbles, the zero point from ``b = 8 + v_off - zf / a`` (exact after
rounding: ``|8 + v_off - b| <= 16`` and ``zf`` carries one bfloat16 rounding, an error below 1/32), and the
scale from ``sz`` when bfloat16 holds it exactly. Otherwise (float16/float32 scales) the layout also keeps
the stored scales (``scale``, 2 or 4 bytes per group: 3 % of the packed codes at group 128). Layers where
this cannot work (a zero scale with a zero point, which ``zf`` cannot carry) keep the Triton layout:
:func:`unsupported` says why.

**Prompts** (``M > TINYGEMM_MAX_M``): tinygemm's time grows with M (5-27x cuBLAS bf16 at M >= 64 on the H200,
docs/gpu_kernels.md), so longer inputs dequantize the layer once per call (:func:`dequantize`, a Triton kernel
that reads this layout) and run cuBLAS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import ops
from ..blocks import row_blocks
from ..schemes import scheme_of_mode
from .quant_layout import DECODE_INT, choose_decode

GROUPS = (32, 64, 128, 256)
TINYGEMM_MAX_M = 16


@dataclass
class TinyWeight:
    """An ``N`` x ``K`` weight in tinygemm's layout (module docstring)."""

    qweight: torch.Tensor
    sz: torch.Tensor
    scale: torch.Tensor  # the stored scales (N, n_groups) where bfloat16 cannot hold them; else empty
    N: int
    K: int
    group_size: int
    mode: int
    v_off: float

    @property
    def inner_k_tiles(self) -> int:
        return self.qweight.shape[3] * 2


def inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def unsupported(bits: int, grid, mode: int, group_size: int, n: int, k: int, a: torch.Tensor,
                b: torch.Tensor | None) -> str | None:
    """None if tinygemm's layout can hold these weights exactly; otherwise why not."""
    decode, _ = choose_decode([float(v) for v in grid])
    if bits != 4 or decode != DECODE_INT:
        return "not a uniform INT4 grid"
    if scheme_of_mode(mode).split_sign:
        return "two-scale scheme"
    if group_size not in GROUPS:
        return f"group_size {group_size} not in {GROUPS}"
    if k % group_size or n % 8:
        return f"K = {k} is not a multiple of the group or N = {n} of 8"
    if not torch.isfinite(a.to(torch.bfloat16)).all():
        return "a scale overflows bfloat16"
    if scheme_of_mode(mode).offset and (a == 0).any():
        return "a zero scale: its zero point would be lost"
    return None


def pack(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, grid, group_size: int, mode: int
         ) -> TinyWeight:
    """Codes uint8 ``(N, K)`` and per-group ``a``/``b`` ``(N, K/group)`` -> :class:`TinyWeight` (ValueError
    where :func:`unsupported` says so)."""
    n, k = codes.shape
    reason = unsupported(4, grid, mode, group_size, n, k, a, b)
    if reason:
        raise ValueError(f"tinygemm cannot hold this weight: {reason}")
    _, v_off = choose_decode([float(v) for v in grid])
    t = inner_k_tiles(k)
    ks = k // (16 * t)
    qweight = torch.empty(n // 8, ks, 32, t // 2, dtype=torch.int32, device=codes.device)
    shifts = 4 * torch.arange(8, device=codes.device, dtype=torch.int64)
    for r in row_blocks(n // 8, 8 * k):  # int64 temporaries of a block of 8-row tiles
        rows = r.stop - r.start
        c = codes[8 * r.start:8 * r.stop].to(torch.int64).view(rows, 8, ks, t // 2, 2, 2, 4, 2)
        # (nt, nr, ks, i, c, a, tk, e) -> (nt, ks, nr, tk, i, e, c, a): lane t = 4 nr + tk, nibble 4 e + 2 c + a
        c = c.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(rows, ks, 32, t // 2, 8)
        words = (c << shifts).sum(-1)
        qweight[r] = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    zero = (8 + v_off - (b.float() if scheme_of_mode(mode).offset else 0.0)) * a.float()
    sz = torch.stack([a.float(), zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
    exact = torch.equal(sz[..., 0].t().to(a.dtype), a)
    scale = a.new_empty(0) if exact else a.contiguous()
    return TinyWeight(qweight, sz, scale, n, k, group_size, mode, v_off)


def unpack(w: TinyWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes uint8 (N, K), a, b)`` exactly as :func:`pack` received them (``b`` None for a sym scheme)."""
    t, ks = w.inner_k_tiles, w.qweight.shape[1]
    codes = torch.empty(w.N, w.K, dtype=torch.uint8, device=w.qweight.device)
    shifts = 4 * torch.arange(8, device=w.qweight.device, dtype=torch.int32)
    for r in row_blocks(w.N // 8, 8 * w.K):
        rows = r.stop - r.start
        c = (w.qweight[r].unsqueeze(-1) >> shifts) & 15  # (nt, ks, nr*4+tk, i, e*4+c*2+a)
        c = c.view(rows, ks, 8, 4, t // 2, 2, 2, 2).permute(0, 2, 1, 4, 6, 7, 3, 5)
        codes[8 * r.start:8 * r.stop] = c.reshape(8 * rows, w.K).to(torch.uint8)
    a = w.scale if w.scale.numel() else w.sz[..., 0].t()
    if not scheme_of_mode(w.mode).offset:
        return codes, a.contiguous(), None
    b = torch.round(8 + w.v_off - w.sz[..., 1].t().float() / a.float())
    return codes, a.contiguous(), b


def dequantize_reference(w: TinyWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, K)`` weights as tinygemm computes them, ``(q - 8) s + zf`` in float32 from the bfloat16 ``sz``."""
    codes = unpack(w)[0].float()
    gi = torch.arange(w.K, device=codes.device) // w.group_size
    s, zf = w.sz[gi, :, 0].t().float(), w.sz[gi, :, 1].t().float()
    return ((codes - 8) * s + zf).to(dtype)


def matmul(x: torch.Tensor, w: TinyWeight) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) -> (M, N) in ``x``'s dtype (see ``torch.ops.hf_efficient.quant_tinygemm``)."""
    return ops.quant_tinygemm(x, w.qweight, w.sz, w.N, w.K, w.group_size)


def dequantize(qweight: torch.Tensor, sz: torch.Tensor, n: int, k: int, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``(N, K)`` weights in ``dtype`` from the layout: the Triton kernel on CUDA (and under
    ``TRITON_INTERPRET=1``), else :func:`dequantize_reference`."""
    if not (qweight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return dequantize_reference(TinyWeight(qweight, sz, sz.new_empty(0), n, k, group_size, 0, -8.0), dtype)
    from .quant_tinygemm_dequant import dequantize_triton

    return dequantize_triton(qweight, sz, n, k, group_size, dtype)


@ops.quant_tinygemm.register_kernel("cuda")
def _quant_tinygemm_cuda(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, n: int, k: int,
                         group_size: int) -> torch.Tensor:
    """``torch.ops.hf_efficient.quant_tinygemm`` on CUDA: tinygemm (bfloat16 activations; float16 ones are
    rounded to bfloat16 for the call) up to :data:`TINYGEMM_MAX_M` rows, dequantize + cuBLAS above."""
    if x.shape[0] > TINYGEMM_MAX_M:
        return torch.nn.functional.linear(x, dequantize(qweight, sz, n, k, group_size, x.dtype))
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), qweight, group_size, sz)
    return y.to(x.dtype)


__all__ = ["TinyWeight", "pack", "unpack", "unsupported", "dequantize", "dequantize_reference", "matmul",
           "inner_k_tiles", "GROUPS", "TINYGEMM_MAX_M"]
