"""Python side of the C++ LUT kernels: weight permutation (once per layer), op wrappers, fake impls.

``prepare(codes, fmt, params, group_size)`` turns a layer's codes and per-group parameters (the storage of
:class:`~hf_efficient.quantization.QuantLinear`) into a :class:`LUTWeight` in the kernel layout documented
in ``csrc/lut_gemm.cpp``; ``LUTWeight.matmul(x)`` runs ``torch.ops.hf_efficient.lut_gemm``.
Set ``HF_EFFICIENT_LUT_SCALAR=1`` (or pass ``force_scalar=True``) to run the portable scalar engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import formats
from . import reference as ref

TILE_N = 16


def ops():
    """``torch.ops.hf_efficient`` with the C++ LUT ops loaded; RuntimeError if the extension is not built."""
    from ... import ops as _ops

    if not _ops.HAS_CPP_OPS:
        raise RuntimeError("the hf_efficient C++ extension is not built: reinstall with "
                           "`pip install --no-build-isolation -e .`")
    return torch.ops.hf_efficient


def available() -> bool:
    from ... import ops as _ops

    return _ops.HAS_CPP_OPS


def isa(force_scalar: bool = False) -> str:
    """The engine ``lut_gemm`` runs: ``"avx2"`` or ``"scalar"``."""
    return ops().lut_isa(force_scalar)


def _register_fakes() -> None:
    if not available():
        return

    @torch.library.register_fake("hf_efficient::lut_gemm")
    def _gemm_fake(x, qweight, coef, zcoef, grid, bits, group_size, out_features, force_scalar=False):
        torch._check(x.dim() == 2, lambda: "lut_gemm: x must be 2-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("hf_efficient::lut_tables")
    def _tables_fake(x, grid, bits, group_size, force_scalar=False):
        kp = ref.padded_k(x.shape[1])
        ch = 1 if grid is None else grid.shape[0]
        ng = (kp + group_size - 1) // group_size
        slots = kp // ref.slot_size(bits, grid is not None)
        return (x.new_empty(x.shape[0], ch, slots, 16, dtype=torch.int8), x.new_empty(x.shape[0], ng),
                x.new_empty(x.shape[0], ng))


_register_fakes()


# ------------------------------------------------------------------------------------------------
# From a format's scale rule to the kernel's (grid, coef, zcoef)
# ------------------------------------------------------------------------------------------------

def kernel_params(fmt: formats.NumericFormat, params: dict):
    """``(grid | None, coef (N, ng, channels), zcoef (N, ng))`` reproducing ``formats.decode`` for ``fmt``.

    INT formats (uniform grid ``c + off``) use the bit-serial engine: ``w = s * (c + off - z)`` gives
    ``coef = s / 2`` and ``zcoef = s * ((2^b - 1) / 2 + off - z)`` (see :mod:`.reference`). Other grids use the
    code-indexed engine: ``sym`` is one channel (``coef = s``); AFPQ ``two_scale`` is two channels, the grid's
    positive part scaled by ``s_pos`` and its negative part by ``s_neg``.
    """
    grid = torch.tensor(fmt.grid, dtype=torch.float32)
    if fmt.bits > 4 or torch.isnan(grid).any():
        raise ValueError(f"LUT kernels support formats of 1..4 bits without NaN codes, got {fmt.name}")
    if fmt.kind == "int":
        off = fmt.grid[0]
        if fmt.grid != tuple(float(c + off) for c in range(2 ** fmt.bits)):
            raise ValueError(f"format {fmt.name}: an INT grid must be c + {off}")
        s = params["scales"].float()
        z = params["zeros"].float() if fmt.scheme == "zero_point" else torch.zeros_like(s)
        if fmt.scheme not in ("sym", "zero_point"):
            raise ValueError(f"format {fmt.name}: scheme {fmt.scheme} is not supported for INT grids")
        return None, (s / 2)[..., None], s * ((2 ** fmt.bits - 1) / 2 + off - z)
    if fmt.scheme == "sym":
        s = params["scales"].float()
        return grid[None], s[..., None], torch.zeros_like(s)
    if fmt.scheme == "two_scale":
        sp, sn = params["scales_pos"].float(), params["scales_neg"].float()
        return torch.stack([grid.clamp(min=0), grid.clamp(max=0)]), torch.stack([sp, sn], -1), torch.zeros_like(sp)
    raise ValueError(f"format {fmt.name}: scheme {fmt.scheme} is not supported by the LUT kernels")


# ------------------------------------------------------------------------------------------------
# Weight permutation
# ------------------------------------------------------------------------------------------------

def _pad_rows_cols(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    np_ = (n + TILE_N - 1) // TILE_N * TILE_N
    return torch.nn.functional.pad(codes, (0, ref.padded_k(k) - k, 0, np_ - n))


def pack_bitserial(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> flat uint8 kernel layout of the bit-serial engine."""
    c = _pad_rows_cols(codes)
    np_, kp = c.shape
    pp = (bits + 1) // 2
    idx = ref.slot_indices(c, bits, None)  # (Np, S, bits)
    idx = torch.nn.functional.pad(idx, (0, 2 * pp - bits))
    # (NT, lane, row-in-lane, slot pair, slot parity, plane pair, plane parity)
    v = idx.view(np_ // TILE_N, 2, 8, kp // 8, 2, pp, 2).permute(0, 3, 5, 1, 2, 6, 4)
    return (v[..., 0] | (v[..., 1] << 4)).to(torch.uint8).contiguous().view(-1)


def pack_code_indexed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> flat uint8 kernel layout of the code-indexed engine."""
    c = _pad_rows_cols(codes)
    np_, kp = c.shape
    idx = ref.slot_indices(c, bits, torch.empty(0))[..., 0]  # (Np, S)
    # (NT, row, 4-slot step, high nibble, lane)
    v = idx.view(np_ // TILE_N, TILE_N, -1, 2, 2).permute(0, 2, 4, 1, 3)
    return (v[..., 0] | (v[..., 1] << 4)).to(torch.uint8).contiguous().view(-1)


def pack_coefs(coef: torch.Tensor, zcoef: torch.Tensor):
    """coef (N, ng, ch), zcoef (N, ng) -> contiguous float32 (NT, ng, ch, 16) and (NT, ng, 16)."""
    n, ng, ch = coef.shape
    np_ = (n + TILE_N - 1) // TILE_N * TILE_N
    c = torch.nn.functional.pad(coef.float(), (0, 0, 0, 0, 0, np_ - n)).view(-1, TILE_N, ng, ch)
    z = torch.nn.functional.pad(zcoef.float(), (0, 0, 0, np_ - n)).view(-1, TILE_N, ng)
    return c.permute(0, 2, 3, 1).contiguous(), z.permute(0, 2, 1).contiguous()


def kernel_group_size(group_size: int, in_features: int) -> int | None:
    """The kernel's group size for a layer's, or None when the kernels cannot run it (not a multiple of 16)."""
    if group_size % ref.K_ALIGN == 0:
        return group_size
    if group_size >= in_features:  # one group (per-channel): it may extend into the zero padding
        return ref.padded_k(in_features)
    return None


@dataclass
class LUTWeight:
    """One layer's weights in the kernel layout (built once by :func:`prepare`)."""

    qweight: torch.Tensor       # uint8, flat kernel layout
    coef: torch.Tensor          # float32 (NT, ng, channels, 16)
    zcoef: torch.Tensor         # float32 (NT, ng, 16)
    grid: torch.Tensor | None   # float32 (channels, 2**bits) or None (bit-serial)
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def matmul(self, x: torch.Tensor, force_scalar: bool = False) -> torch.Tensor:
        """``x`` (..., in_features) any float dtype -> float32 (..., out_features) = x @ W^T (LUT approximation)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"lut matmul: x has {x.shape[-1]} features, the weight expects {self.in_features}")
        x2 = x.reshape(-1, self.in_features).float()
        y = ops().lut_gemm(x2, self.qweight, self.coef, self.zcoef, self.grid, self.bits, self.group_size,
                           self.out_features, force_scalar)
        return y.view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.coef, self.zcoef))


def prepare_spec(codes: torch.Tensor, bits: int, group_size: int, grid, coef, zcoef) -> LUTWeight:
    """Build a :class:`LUTWeight` from codes (N, K) uint8 and an explicit kernel spec (see :func:`kernel_params`)."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be 2-D uint8 (out_features, in_features), got {codes.dtype} {tuple(codes.shape)}")
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be 1..4 for the LUT kernels, got {bits}")
    if grid is None and bits == 1:
        raise ValueError("1-bit weights need a grid (code-indexed engine), e.g. grid=[[0., 1.]]")
    n, k = codes.shape
    ng = (ref.padded_k(k) + group_size - 1) // group_size
    if group_size % ref.K_ALIGN or group_size <= 0:
        raise ValueError(f"group_size must be a positive multiple of {ref.K_ALIGN}, got {group_size}")
    if coef.shape[:2] != (n, ng) or zcoef.shape != (n, ng):
        raise ValueError(f"coef must be ({n}, {ng}, channels) and zcoef ({n}, {ng}); got {tuple(coef.shape)} "
                         f"and {tuple(zcoef.shape)}")
    packed = pack_bitserial(codes, bits) if grid is None else pack_code_indexed(codes, bits)
    c, z = pack_coefs(coef, zcoef)
    g = None if grid is None else torch.as_tensor(grid, dtype=torch.float32).reshape(-1, 2 ** bits).contiguous()
    return LUTWeight(packed, c, z, g, bits, group_size, k, n)


def prepare(codes: torch.Tensor, fmt, params: dict, group_size: int) -> LUTWeight:
    """Kernel-layout weights from a format, codes (N, K) and per-group params {name: (N, ng)}."""
    fmt = formats.get_format(fmt)
    kg = kernel_group_size(group_size, codes.shape[1])
    if kg is None:
        raise ValueError(f"LUT kernels need group_size to be a multiple of {ref.K_ALIGN} (or per-channel), "
                         f"got {group_size}")
    grid, coef, zcoef = kernel_params(fmt, params)
    return prepare_spec(codes, fmt.bits, kg, grid, coef, zcoef)
