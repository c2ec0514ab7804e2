"""Plain-torch twin of the C++ LUT kernels (``csrc/lut_gemm.cpp``): the test oracle and the documentation.

A LUT GEMV never dequantizes weights. For each activation row it builds small tables of partial sums of
activations, quantizes them to int8, and sums table entries selected by the weight codes:

* **bit-serial** (``grid=None``; uniform INT codes, bits 2..4): code ``c = sum_j 2^j b_j``. For 4 activations
  ``a_0..a_3`` the table is ``T[idx] = sum_i (+a_i if bit i of idx else -a_i)``, so the plane-``j`` partial sum is
  ``sum_i b_ij a_i = (T[idx_j] + sum_i a_i) / 2``. Hence ``sum_i c_i a_i = 1/2 sum_j 2^j T[idx_j] +
  (2^bits - 1)/2 * sum_i a_i`` and the sum over a group is ``I / 2 * tscale + (2^bits-1)/2 * gsum``, where ``I`` is the
  integer sum of the int8 entries weighted by ``2^j``.
* **code-indexed** (``grid`` of shape ``(channels, 2**bits)``; any grid): the index is the concatenation of the
  codes of ``gp = 4 // bits`` activations (bits 3: one activation, 8 entries) and ``T[idx] = sum_i grid[c_i] * a_i``.

The integer sums are combined per weight group ``g`` and output row ``n`` as
``y[n] = sum_g (sum_ch tscale_g * I[n, g, ch] * coef[n, g, ch] + gsum_g * zcoef[n, g])``.
:func:`kernel_params` gives ``coef``/``zcoef`` for every scale rule of :mod:`hf_efficient.formats`.
"""
from __future__ import annotations

import torch

K_ALIGN = 16


def slot_size(bits: int, codes: bool) -> int:
    """Activations per table: 4 for bit-serial, ``4 // bits`` (bits 3: 1) for code-indexed tables."""
    if not codes:
        return 4
    return 1 if bits == 3 else 4 // bits


def padded_k(k: int) -> int:
    return (k + K_ALIGN - 1) // K_ALIGN * K_ALIGN


def table_entries(x: torch.Tensor, grid: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float tables ``(M, channels, slots, 16)`` for activations ``x`` (M, Kp), in the kernel's summation order."""
    m, kp = x.shape
    x = x.float()
    if grid is None:
        a = x.view(m, kp // 4, 4)
        idx = torch.arange(16)
        signs = torch.where((idx[:, None] >> torch.arange(4)) & 1 == 1, 1.0, -1.0)  # (16, 4)
        t = a[:, :, None, 0] * signs[:, 0]
        for i in range(1, 4):
            t = t + a[:, :, None, i] * signs[:, i]
        return t[:, None]
    gp = slot_size(bits, True)
    a = x.view(m, kp // gp, gp)
    idx = torch.arange(16)
    valid = idx < 8 if bits == 3 else torch.ones(16, dtype=torch.bool)
    chans = []
    for ch in range(grid.shape[0]):
        t = torch.zeros(m, kp // gp, 16)
        for i in range(gp):
            code = (idx >> (bits * i)) & ((1 << bits) - 1)
            t = t + grid[ch].float()[code] * a[:, :, i, None]
        chans.append(torch.where(valid, t, torch.zeros(())))
    return torch.stack(chans, 1)


def lut_tables(x: torch.Tensor, grid: torch.Tensor | None, bits: int, group_size: int):
    """Reference of ``torch.ops.hf_efficient.lut_tables``: int8 tables, table scales and group sums.

    Args: ``x`` float (M, K); ``grid`` None (bit-serial) or float (channels, 2**bits); ``group_size`` multiple of 16.
    Returns ``(tab int8 (M, channels, slots, 16), tscale float (M, ng), gsum float (M, ng))``: ``tscale`` is the
    group's max |entry| / 127 over all channels; entries are ``round(T * (127 / max))`` (half to even).
    """
    m, k = x.shape
    kp = padded_k(k)
    xp = torch.nn.functional.pad(x.float(), (0, kp - k))
    ng = (kp + group_size - 1) // group_size
    t = table_entries(xp, grid, bits)
    slot = slot_size(bits, grid is not None)
    group_of_slot = torch.arange(kp // slot) * slot // group_size
    absmax = t.abs().amax(dim=(1, 3))  # (M, slots)
    maxabs = torch.zeros(m, ng).scatter_reduce(1, group_of_slot.expand(m, -1), absmax, "amax", include_self=True)
    inv = torch.where(maxabs > 0, 127.0 / maxabs, torch.zeros(()))
    q = torch.round(t * inv[:, None, group_of_slot, None]).clamp(-127, 127).to(torch.int8)
    gsum = torch.nn.functional.pad(xp, (0, ng * group_size - kp)).view(m, ng, group_size).sum(-1)
    return q, maxabs / 127.0, gsum


def slot_indices(codes: torch.Tensor, bits: int, grid: torch.Tensor | None) -> torch.Tensor:
    """Table indices ``(N, slots, planes)`` of codes (N, Kp): bit-serial planes, or one code-indexed plane."""
    n, kp = codes.shape
    c = codes.long()
    if grid is None:
        bitsel = (c.view(n, kp // 4, 4, 1) >> torch.arange(bits)) & 1  # (N, slots, 4, bits)
        return (bitsel << torch.arange(4)[:, None]).sum(2)
    gp = slot_size(bits, True)
    return (c.view(n, kp // gp, gp) << (bits * torch.arange(gp))).sum(-1, keepdim=True)


def lut_gemm(x: torch.Tensor, codes: torch.Tensor, coef: torch.Tensor, zcoef: torch.Tensor,
             grid: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Reference LUT GEMM: ``x`` float (M, K), ``codes`` uint8 (N, K), ``coef`` (N, ng, channels), ``zcoef`` (N, ng).

    Integer sums are exact; the epilogue runs in float64 (the kernel's float32 differs by rounding only).
    """
    m, k = x.shape
    n = codes.shape[0]
    kp = padded_k(k)
    tab, tscale, gsum = lut_tables(x, grid, bits, group_size)
    idx = slot_indices(torch.nn.functional.pad(codes, (0, kp - k)), bits, grid)  # (N, slots, planes)
    slot = slot_size(bits, grid is not None)
    ng = tscale.shape[1]
    group_of_slot = torch.arange(kp // slot) * slot // group_size
    weights = (2 ** torch.arange(idx.shape[2])).double()  # bit-serial plane weights; one plane otherwise
    y = torch.zeros(m, n, dtype=torch.float64)
    for ch in range(tab.shape[1]):
        t = tab[:, ch].double()  # (M, slots, 16)
        looked = t[:, torch.arange(kp // slot)[:, None, None], idx.permute(1, 0, 2)]  # (M, slots, N, planes)
        per_slot = (looked * weights).sum(-1)  # (M, slots, N)
        isum = torch.zeros(m, ng, n, dtype=torch.float64).index_add_(1, group_of_slot, per_slot)
        y += (isum * tscale.double()[:, :, None] * coef[:, :, ch].double().T[None]).sum(1)
    y += gsum.double() @ zcoef.double().T
    return y.float()


def error_bound(coef: torch.Tensor, tscale: torch.Tensor, bits: int, group_size: int, k: int,
                codes_indexed: bool) -> torch.Tensor:
    """Bound ``(M, N)`` on |LUT result - exact x @ W^T| from int8 table rounding (half a step per lookup).

    Bit-serial: per slot the planes' rounding errors weigh ``sum_j 2^j = 2^bits - 1`` and the sum is halved
    (``coef`` already holds ``scale / 2``). Code-indexed: one lookup per slot and channel.
    """
    kp = padded_k(k)
    ng = tscale.shape[1]
    lens = torch.tensor([min(group_size, kp - g * group_size) for g in range(ng)], dtype=torch.float64)
    slots = lens / slot_size(bits, codes_indexed)
    per_lookup = 0.5 * (1 if codes_indexed else 2 ** bits - 1)
    c = coef.double().abs().sum(-1)  # (N, ng)
    return (tscale.double() * slots * per_lookup) @ c.T
