"""Python side of the C++ LUT kernels: weight permutation (once per layer) and op wrappers.

``prepare(codes, fmt, params, group_size)`` turns a layer's codes and per-group parameters (the storage of
:class:`~hf_efficient.quantization.QuantLinear`) into a :class:`LUTWeight` in the kernel layout documented
in ``csrc/lut_gemm.cpp``; ``LUTWeight.matmul(x)`` runs ``torch.ops.hf_efficient.lut_gemm``.
Set ``HF_EFFICIENT_LUT_SCALAR=1`` (or pass ``force_scalar=True``) to run the portable scalar engine, and
``HF_EFFICIENT_LUT_ISA=scalar|avx2|avx512|neon`` to cap the engine the CPU would otherwise get (see
:func:`available_isas`). Inputs of more than ``lut_max_rows()`` rows (prefill) run a blocked dequantize + BLAS
GEMM inside the same op. The ops' fakes are in :mod:`hf_efficient.ops`; the plain-torch twin is
:mod:`.lut_cpu_reference`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats, ops as _ops
from . import lut_cpu_reference as ref

SUB = 2          # 16-row subtiles per tile (they share each table load)
TILE_N = 16 * SUB


def ops():
    """``torch.ops.hf_efficient`` with the C++ LUT ops loaded; RuntimeError if the extension is not built."""
    if not _ops.HAS_CPP_OPS:
        raise RuntimeError("the hf_efficient C++ extension is not built: reinstall with "
                           "`pip install --no-build-isolation -e .`")
    return torch.ops.hf_efficient


_GEMM = None


def _gemm_op():
    # Cached: decode calls this once per layer and token, and a torch.ops attribute lookup is not free.
    global _GEMM
    if _GEMM is None:
        _GEMM = ops().lut_gemm.default
    return _GEMM


def available() -> bool:
    return _ops.HAS_CPP_OPS


def isa(force_scalar: bool = False) -> str:
    """The best engine ``lut_gemm`` runs here: ``"avx512"``, ``"avx2"``, ``"neon"`` or ``"scalar"`` (chosen by cpuid
    at run time; INT3 tiles run the AVX2 engine on AVX-512 CPUs)."""
    return ops().lut_isa(force_scalar)


def available_isas() -> list[str]:
    """Every engine this CPU can run, scalar first (each selectable with ``HF_EFFICIENT_LUT_ISA``)."""
    best = isa()
    order = ["scalar", "neon"] if best == "neon" else ["scalar", "avx2", "avx512"]
    return order[:order.index(best) + 1]


def max_lut_rows() -> int:
    """Inputs with more rows than this run the dequantize + BLAS path (``HF_EFFICIENT_LUT_MAX_ROWS`` moves it)."""
    return ops().lut_max_rows()


# ------------------------------------------------------------------------------------------------
# From a format's scale rule to the kernel's (grid, coef, zcoef)
# ------------------------------------------------------------------------------------------------

def kernel_params(fmt: formats.NumericFormat, params: dict):
    """``(grid | None, coef (N, ng, channels), zcoef (N, ng))`` reproducing ``formats.decode`` for ``fmt``.

    INT formats (uniform grid ``c + off``) use the bit-serial engine: ``w = s * (c + off - z)`` gives
    ``coef = s / 2`` and ``zcoef = s * ((2^b - 1) / 2 + off - z)`` (see :mod:`.lut_cpu_reference`). Other grids use the
    code-indexed engine, one channel per non-zero function of the scheme's split
    (:meth:`~hf_efficient.schemes.Scheme.value_split`): ``sym`` is one channel (``coef = s``); AFPQ
    ``two_scale`` is two channels, the grid's positive part scaled by ``s_pos`` and its negative part by ``s_neg``.
    """
    grid = torch.tensor(fmt.grid, dtype=torch.float32)
    sch = fmt.scale_scheme
    if fmt.bits > 4 or torch.isnan(grid).any():
        raise ValueError(f"LUT kernels support formats of 1..4 bits without NaN codes, got {fmt.name}")
    a, b = sch.kernel_ab(params)
    s = a.float()
    if fmt.kind == "int":
        off = fmt.grid[0]
        if fmt.grid != tuple(float(c + off) for c in range(2 ** fmt.bits)):
            raise ValueError(f"format {fmt.name}: an INT grid must be c + {off}")
        if sch.split_sign:
            raise ValueError(f"format {fmt.name}: scheme {fmt.scheme} is not supported for INT grids")
        z = b.float() if sch.offset else torch.zeros_like(s)
        return None, (s / 2)[..., None], s * ((2 ** fmt.bits - 1) / 2 + off - z)
    if sch.offset:
        raise ValueError(f"format {fmt.name}: scheme {fmt.scheme} is not supported by the LUT kernels")
    if not sch.split_sign:
        return grid[None], s[..., None], torch.zeros_like(s)
    return torch.stack(sch.value_split(grid)), torch.stack([s, b.float()], -1), torch.zeros_like(s)


# ------------------------------------------------------------------------------------------------
# Weight permutation: one byte stream per tile of TILE_N rows (codes and coefficients interleaved)
# ------------------------------------------------------------------------------------------------

def _pad_rows_cols(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    np_ = (n + TILE_N - 1) // TILE_N * TILE_N
    return torch.nn.functional.pad(codes, (0, ref.padded_k(k) - k, 0, np_ - n))


def pack_bitserial(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> bit-serial code bytes (NT, slot pairs, bytes per step).

    Per step: (SUB, plane pairs, 32) for planes 0..2*(bits//2)-1, then for odd ``bits`` the top plane of all
    TILE_N rows in 32 bytes.
    """
    c = _pad_rows_cols(codes)
    np_, kp = c.shape
    nt, pp = np_ // TILE_N, bits // 2
    idx = ref.slot_indices(c, bits, None)  # (Np, S, bits)
    # (NT, sub, lane, row-in-lane, slot pair, slot parity, plane pair, plane parity)
    v = idx[..., :2 * pp].reshape(nt, SUB, 2, 8, kp // 8, 2, pp, 2).permute(0, 4, 1, 6, 2, 3, 7, 5)
    parts = [(v[..., 0] | (v[..., 1] << 4)).reshape(nt, kp // 8, -1)]
    if bits % 2:
        top = idx[..., bits - 1].reshape(nt, TILE_N, kp // 8, 2).permute(0, 2, 1, 3)  # (NT, step, row, parity)
        parts.append((top[..., 0] | (top[..., 1] << 4)).reshape(nt, kp // 8, -1))
    return torch.cat(parts, 2).to(torch.uint8)


def pack_code_indexed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> code-indexed bytes (NT, 4-slot steps, SUB, 32)."""
    c = _pad_rows_cols(codes)
    np_, kp = c.shape
    idx = ref.slot_indices(c, bits, torch.empty(0))[..., 0]  # (Np, S)
    # (NT, sub, row, 4-slot step, high nibble, lane) -> (NT, step, sub, lane, row, high nibble)
    v = idx.view(np_ // TILE_N, SUB, 16, -1, 2, 2).permute(0, 3, 1, 5, 2, 4)
    return (v[..., 0] | (v[..., 1] << 4)).to(torch.uint8).reshape(np_ // TILE_N, idx.shape[1] // 4, -1)


def stored_coefs(coef: torch.Tensor, zcoef: torch.Tensor):
    """The coefficients the kernel really uses: ``coef`` rounded to fp16 and ``zcoef = coef[..., 0] * zmul``
    with ``zmul`` in fp16. Returns ``(coef16 (N, ng, ch), zmul16 (N, ng), coef_eff float, zcoef_eff float)``.

    Storing ``zcoef`` as a multiple of ``coef[..., 0]`` keeps INT zero points exact: there ``coef = s / 2`` and
    ``zmul = 2^b - 1 + 2 off - 2 z`` is a small integer, and ``fp16 * integer`` is exact in the float32 epilogue.
    """
    c16 = coef.to(torch.float16)
    c0 = c16[..., 0].float()
    if not torch.isfinite(c16).all():
        raise ValueError("coef must be finite and fit in float16 (|coef| <= 65504)")
    if ((c0 == 0) & (zcoef != 0)).any():
        raise ValueError("zcoef must be 0 where coef[..., 0] is 0 (it is stored as a multiple of coef[..., 0])")
    zmul = torch.where(c0 != 0, zcoef.double() / c0.double().where(c0 != 0, torch.ones(())), torch.zeros(()))
    z16 = zmul.to(torch.float16)
    if not torch.isfinite(z16).all():
        raise ValueError("zcoef / coef[..., 0] must fit in float16")
    return c16, z16, c16.float(), c0 * z16.float()


def pack_stream(wbytes: torch.Tensor, steps_per_group: int, coef16: torch.Tensor, zmul16: torch.Tensor) -> torch.Tensor:
    """Interleave code bytes (NT, steps, B) with per-group fp16 coefficients into one flat stream.

    Per tile, per group: the group's code bytes, then coef (SUB, channels, 16) and zmul (SUB, 16) as fp16,
    so a tile is read as one sequential stream (see csrc/lut_gemm.cpp).
    """
    nt, steps, _ = wbytes.shape
    n, ng, ch = coef16.shape
    np_ = nt * TILE_N
    c = torch.nn.functional.pad(coef16, (0, 0, 0, 0, 0, np_ - n)).view(nt, SUB, 16, ng, ch).permute(0, 3, 1, 4, 2)
    z = torch.nn.functional.pad(zmul16, (0, 0, 0, np_ - n)).view(nt, SUB, 16, ng).permute(0, 3, 1, 2)
    cz = torch.cat([c.reshape(nt, ng, -1), z.reshape(nt, ng, -1)], 2).contiguous().view(torch.uint8)
    parts = []
    for g in range(ng):
        parts += [wbytes[:, g * steps_per_group:(g + 1) * steps_per_group].reshape(nt, -1), cz[:, g]]
    out = _stream_buffer(sum(p.shape[1] for p in parts) * nt)
    torch.cat(parts, 1, out=out.view(nt, -1))
    return out


def _stream_buffer(nbytes: int) -> torch.Tensor:
    """Uninitialised uint8 storage the kernels read fastest: transparent huge pages where the OS allows
    (``hf_efficient::hugepage_empty``), so a DRAM-bound GEMV is not slowed by a page walk every 4 KiB."""
    return ops().hugepage_empty(nbytes) if available() else torch.empty(nbytes, dtype=torch.uint8)


PAGE = 4096  # where _stream_buffer's storage starts: a 4 KiB page boundary (2 MiB for larger streams)


def stream_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor (a weight stream or a float weight) in the kernels' storage (see
    :func:`_stream_buffer`): same dtype, shape and values, starting on a page boundary."""
    return _stream_buffer(t.numel() * t.element_size()).view(t.dtype).view(t.shape).copy_(t)


def placed(t: torch.Tensor) -> bool:
    """Whether ``t`` starts where :func:`stream_copy` would put it (a page boundary): a stream read at every
    decode step runs measurably faster from there than from an arbitrary offset (docs/lut.md, round 12)."""
    return t.data_ptr() % PAGE == 0


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

    qweight: torch.Tensor       # uint8, flat stream: per tile, per group, codes then fp16 coefficients
    grid: torch.Tensor | None   # float32 (channels, 2**bits) or None (bit-serial)
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def matmul(self, x: torch.Tensor, force_scalar: bool = False) -> torch.Tensor:
        """``x`` (..., in_features) any float dtype -> float32 (..., out_features) = x @ W^T (LUT approximation)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"lut matmul: x has {x.shape[-1]} features, the weight expects {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = _gemm_op()(x2, self.qweight, self.grid, self.bits, self.group_size, self.out_features, force_scalar)
        return y.view(*x.shape[:-1], self.out_features) if x.dim() != 2 else y

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(out_features, in_features)`` weight the stream holds (the prefill path's values)."""
        return ops().lut_dequant(self.qweight, self.grid, self.bits, self.group_size, self.in_features,
                                 self.out_features)

    def codes(self) -> torch.Tensor:
        """The uint8 ``(out_features, in_features)`` codes the stream holds (the inverse of the packing)."""
        return ops().lut_codes(self.qweight, self.bits, self.group_size, self.in_features, self.out_features,
                               self.grid is not None)

    def nbytes(self) -> int:
        return self.qweight.numel()


def prepare_spec(codes: torch.Tensor, bits: int, group_size: int, grid, coef, zcoef) -> LUTWeight:
    """Build a :class:`LUTWeight` from codes (N, K) uint8 and an explicit kernel spec (see :func:`kernel_params`).

    ``coef``/``zcoef`` are stored as fp16 (see :func:`stored_coefs`, which gives the values the kernel uses).
    """
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
    if coef.dim() != 3 or coef.shape[:2] != (n, ng) or zcoef.shape != (n, ng):
        raise ValueError(f"coef must be ({n}, {ng}, channels) and zcoef ({n}, {ng}); got {tuple(coef.shape)} "
                         f"and {tuple(zcoef.shape)}")
    g = None if grid is None else torch.as_tensor(grid, dtype=torch.float32).reshape(-1, 2 ** bits).contiguous()
    if coef.shape[2] != (1 if g is None else g.shape[0]):
        raise ValueError(f"coef has {coef.shape[2]} channels, the grid has {1 if g is None else g.shape[0]}")
    c16, z16, _, _ = stored_coefs(coef, zcoef)
    pack = pack_bitserial if g is None else pack_code_indexed
    # Tiles pack independently: a block of rows at a time bounds the int64 index temporaries (~30x the codes'
    # bytes) to a few MiB instead of ~70 MiB for a 1536x576 layer, which was the peak of loading a LUT model.
    rows = max(TILE_N, PACK_CODES // ref.padded_k(k) // TILE_N * TILE_N)
    wbytes = torch.cat([pack(codes[r:r + rows], bits) for r in range(0, n, rows)])
    steps = group_size // 8 if g is None else group_size // ref.slot_size(bits, True) // 4
    return LUTWeight(pack_stream(wbytes, steps, c16, z16), g, bits, group_size, k, n)


PACK_CODES = 1 << 17  # codes packed per block in prepare_spec


# Activations per int8 table scale of the code-indexed (FP/NF) tables. The tables of a kernel group share one
# scale, so one activation outlier coarsens every entry of its group; on the embedded model 128-wide table
# groups cost AFPQ FP4 g128 most of its accuracy and 32-wide ones almost none (figures in docs/lut.md). Wider
# weight groups are split into 32-wide kernel groups with repeated coefficients (more coefficient bytes in the
# stream). INT (bit-serial) tables did not need it, so they keep the weight group and its smaller stream.
TABLE_GROUP = 32


def split_groups(coef: torch.Tensor, zcoef: torch.Tensor, group_size: int, in_features: int, table_group: int):
    """``(coef, zcoef, group_size)`` with each group of ``group_size`` split into ``table_group``-wide ones
    (coefficients repeated), when ``table_group`` divides it; unchanged otherwise."""
    if not table_group or group_size <= table_group or group_size % table_group:
        return coef, zcoef, group_size
    r = group_size // table_group
    ng = (ref.padded_k(in_features) + table_group - 1) // table_group
    return coef.repeat_interleave(r, 1)[:, :ng], zcoef.repeat_interleave(r, 1)[:, :ng], table_group


def prepare(codes: torch.Tensor, fmt, params: dict, group_size: int, table_group: int = TABLE_GROUP) -> LUTWeight:
    """Kernel-layout weights from a format, codes (N, K) and per-group params {name: (N, ng)}.

    ``table_group``: activations per table scale of code-indexed formats (see :data:`TABLE_GROUP`; 0 = the
    weight group size); INT formats keep their weight group.
    """
    fmt = formats.get_format(fmt)
    kg = kernel_group_size(group_size, codes.shape[1])
    if kg is None:
        raise ValueError(f"LUT kernels need group_size to be a multiple of {ref.K_ALIGN} (or per-channel), "
                         f"got {group_size}")
    grid, coef, zcoef = kernel_params(fmt, params)
    if grid is not None:
        coef, zcoef, kg = split_groups(coef, zcoef, kg, codes.shape[1], table_group)
    return prepare_spec(codes, fmt.bits, kg, grid, coef, zcoef)
