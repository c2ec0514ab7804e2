"""Plain-torch twins of the quantized matmul kernels (test oracles and CPU fallbacks).

Every function reads the same integers as the kernels (:class:`~hf_efficient.kernels.quant_layout.KernelWeight`),
so a kernel and its reference differ only in arithmetic order and rounding.
"""
from __future__ import annotations

import torch

from .quant_layout import LUT_G, MODE_SYM, MODE_TWO, MODE_ZERO, KernelWeight, unpack


def dequantize_reference(kw: KernelWeight) -> torch.Tensor:
    """The ``(N, K)`` float32 weight: ``formats.decode`` rules applied to the kernel layout."""
    codes = unpack(kw).long()
    v = kw.table[codes]
    gi = torch.arange(kw.K, device=codes.device) // kw.group_size
    a = kw.params[0].float()[:, gi]
    b = kw.params[1].float()[:, gi]
    if kw.mode == MODE_SYM:
        return v * a
    if kw.mode == MODE_ZERO:
        return (v - b) * a
    return v * torch.where(v < 0, b, a)


def quant_matmul_reference(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``x`` (..., K): float32 arithmetic, rounded once to ``x.dtype``."""
    y = x.float() @ dequantize_reference(kw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# LUT formulation (the algorithm of kernels/quant_lut.py, in torch)
# ------------------------------------------------------------------------------------------------

def _parity(t: torch.Tensor) -> torch.Tensor:
    t = t ^ (t >> 4)
    t = t ^ (t >> 2)
    return (t ^ (t >> 1)) & 1


def walsh_terms(kw: KernelWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit-serial decomposition of the grid: ``(masks int32 (T,), beta1 (T,), beta2 (T,))``.

    Within a group the weight is ``w(c) = coef1 * f1(c) + coef2 * f2(c)`` (MODE_SYM: f1 = v, f2 = 0;
    MODE_ZERO: f1 = v, f2 = -1, coef2 = a*b; MODE_TWO: f1 = v if v >= 0 else 0, f2 = v if v < 0 else 0,
    coef2 = b; coef1 = a). Any function of a ``bits``-bit code is a sum over bit masks ``S`` of
    ``beta_S * (-1)**parity(c & S)`` (its Walsh-Hadamard spectrum), so ``sum_k x_k f(c_k)`` is a sum over
    the non-zero terms of table lookups indexed by the parity bits of 4 codes. A uniform INT grid has
    ``bits + 1`` terms (one per bit plane plus the constant) -- classic bit-serial; NF/FP grids have more.
    """
    n = 2 ** kw.bits
    v = kw.table.double().cpu()
    if kw.mode == MODE_SYM:
        f1, f2 = v, torch.zeros_like(v)
    elif kw.mode == MODE_ZERO:
        f1, f2 = v, -torch.ones_like(v)
    else:
        f1, f2 = torch.where(v >= 0, v, 0.0), torch.where(v < 0, v, 0.0)
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
    coef2 = {MODE_SYM: torch.zeros_like(a), MODE_ZERO: a * b, MODE_TWO: b}[kw.mode]
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
