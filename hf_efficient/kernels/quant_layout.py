"""Kernel-side layout of a low-bit weight matrix, built once at load time (``repack``).

The on-disk layout (:mod:`hf_efficient.quantization.packing`) packs codes row by row along K with
``32 // bits`` codes per word (3 bits: 10 per word, which never lines up with a group). The kernels
want something else, so a layer is repacked once when it is first used on CUDA:

``qweight``  int32 ``(N, KW)``, **K contiguous per output row**, K padded up to ``Kp = n_groups * group_size``,
             ``KW = Kp * bits / 32``. K is cut into *chunks* of 32 codes (every group size is a whole number
             of chunks, so a chunk never straddles a group). Bits 2/4/8: a chunk is ``W = bits`` words, each
             holding ``P = 32 // bits`` codes, **interleaved**: code ``r`` of the chunk sits in word ``r % W`` at
             bit ``(r // W) * bits``. So "slot ``j`` of the chunk's ``W`` words" is the ``W`` *consecutive*
             codes ``j*W .. j*W+W-1``: a GEMV program loads a chunk with one 128-bit load (4 bits) and, for each
             slot, meets ``W`` consecutive activations (one vector load), with one shift per code and no
             transposes. Bits 3: two planes per row, ``[0, Kp/16)`` the low two bits (2-bit rule above,
             ``W = 2``) and ``[Kp/16, KW)`` the top bit, one word per chunk, bit ``r`` for code ``r``: 3-bit
             weights cost 3 bits, not 4. Padding codes are 0 (the padded activations are 0, so they add 0).
``params``   ``(2, N, n_groups)`` in the scale storage dtype: ``[0]`` = ``a``, ``[1]`` = ``b`` (``b = a`` for a
             one-parameter scheme), decoded by the rule of the scheme whose ``mode`` is ``mode``
             (:mod:`hf_efficient.schemes`: sym ``w = v * a``; zero point ``w = (v - b) * a``; two scales
             ``w = v * (b if v < 0 else a)``), i.e. exactly :func:`hf_efficient.formats.decode`.
``table``    float32 ``(2**bits,)`` value grid ``v = table[code]`` (DECODE_TABLE). Uniform INT grids decode
             arithmetically (DECODE_INT: ``v = code + v_off``) and FP4-E2M1 from its bits (DECODE_E2M1), so
             those formats make no table lookups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..blocks import row_blocks
from ..schemes import Scheme, scheme_of_mode

DECODE_TABLE, DECODE_INT, DECODE_E2M1 = 0, 1, 2
KERNEL_BITS = (2, 3, 4, 8)
LUT_G = 4  # activations per LUT table: 2**4 patterns, 8 stored (symmetrised)


@dataclass
class KernelWeight:
    """A weight matrix in kernel layout (see module docstring). ``N`` outputs, ``K`` inputs."""

    qweight: torch.Tensor
    params: torch.Tensor
    table: torch.Tensor
    N: int
    K: int
    bits: int
    group_size: int
    mode: int  # the scheme's kernel mode (:attr:`hf_efficient.schemes.Scheme.mode`)
    decode: int
    v_off: float = 0.0
    lut_masks: torch.Tensor | None = None  # LUT kernel terms, filled by quant_lut.prepare_lut
    lut_betas: torch.Tensor | None = None

    @property
    def scheme(self) -> Scheme:
        return scheme_of_mode(self.mode)

    @property
    def n_groups(self) -> int:
        return self.params.shape[2]

    @property
    def Kp(self) -> int:
        return self.n_groups * self.group_size

    @property
    def KW(self) -> int:
        """int32 words per output row."""
        return self.qweight.shape[1]

    @property
    def plane0_words(self) -> int:
        """Words per row of the first plane (the 1-bit plane of 3-bit weights starts here)."""
        return self.Kp // 16 if self.bits == 3 else self.KW

    def nbytes(self) -> int:
        """Bytes a kernel must read: packed codes + per-group parameters (the table is negligible)."""
        return self.qweight.numel() * 4 + self.params.numel() * self.params.element_size()


def e2m1_values() -> list[float]:
    """What DECODE_E2M1 computes for codes 0..15 (sign-magnitude E2M1, subnormal at exponent 0)."""
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    return mags + [-m for m in mags]


def choose_decode(grid: list[float]) -> tuple[int, float]:
    """The cheapest exact decode for ``grid`` (values by code): (DECODE_*, v_off)."""
    n = len(grid)
    if all(not math.isnan(v) and v == grid[0] + c for c, v in enumerate(grid)) and float(grid[0]).is_integer():
        return DECODE_INT, float(grid[0])
    if n == 16 and all(a == b and math.copysign(1, a) == math.copysign(1, b) for a, b in zip(grid, e2m1_values())):
        return DECODE_E2M1, 0.0
    return DECODE_TABLE, 0.0


CHUNK = 32  # codes per interleaved chunk (see module docstring)


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes (N, Kp) int64 of ``width`` bits -> int32 (N, Kp * width // 32), chunk-interleaved."""
    n, kp = codes.shape
    per, w = 32 // width, width  # slots per word, words per chunk
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * width).view(1, 1, per, 1)
    words = (codes.view(n, kp // CHUNK, per, w) << shifts).sum(2).view(n, -1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # int32 two's complement
    return words.to(torch.int32)


def check_weight_args(codes, a, b, grid, bits: int, group_size: int, mode: int, allowed_bits, group_multiple: int,
                      who: str) -> tuple[int, int, int]:
    """Validate the inputs of a kernel-layout builder; returns ``(N, K, n_groups)`` or raises ValueError."""
    if bits not in allowed_bits:
        raise ValueError(f"bits must be one of {tuple(allowed_bits)} for {who}, got {bits}")
    if group_size <= 0 or group_size % group_multiple:
        raise ValueError(f"group_size must be a positive multiple of {group_multiple} for {who}, got {group_size}")
    scheme_of_mode(mode)  # raises on an unknown mode
    if codes.device != a.device or (b is not None and b.device != a.device):
        raise ValueError(f"codes, a and b must be on one device, got {codes.device}, {a.device}, "
                         f"{None if b is None else b.device}")
    n, k = codes.shape
    ng = -(-k // group_size)
    if a.shape != (n, ng) or (b is not None and b.shape != (n, ng)):
        raise ValueError(f"params must be (N, n_groups) = {(n, ng)}, got {tuple(a.shape)} and "
                         f"{None if b is None else tuple(b.shape)}")
    if len(grid) != 2 ** bits:
        raise ValueError(f"grid must have 2**bits = {2 ** bits} values, got {len(grid)}")
    return n, k, ng


def repack(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, grid, bits: int, group_size: int,
           mode: int) -> KernelWeight:
    """Build the kernel layout from codes uint8 ``(N, K)`` and per-group ``a``/``b`` ``(N, n_groups)``.

    ``grid`` is the value grid by code (sequence of 2**bits floats); ``mode`` a scheme's kernel mode. ``b`` may be
    None for a one-parameter scheme.
    Raises ValueError for unsupported bits, group sizes or mismatched shapes.
    """
    n, k, ng = check_weight_args(codes, a, b, grid, bits, group_size, mode, KERNEL_BITS, 32, "the GPU kernels")
    kp = ng * group_size
    qweight = torch.empty(n, kp * bits // 32, dtype=torch.int32, device=codes.device)
    p0 = kp // 16 if bits == 3 else qweight.shape[1]
    for r in row_blocks(n, kp):  # int64 temporaries of a block: whole-matrix ones set the GPU's peak at load
        c = torch.zeros(r.stop - r.start, kp, dtype=torch.int64, device=codes.device)
        c[:, :k] = codes[r]
        if bits == 3:
            qweight[r, :p0] = _pack_plane(c & 3, 2)
            qweight[r, p0:] = _pack_plane(c >> 2, 1)
        else:
            qweight[r] = _pack_plane(c, bits)
    b = a if b is None else b
    params = torch.stack([a, b.to(a.dtype)], 0).contiguous()
    grid = [float(v) for v in grid]
    decode, v_off = choose_decode(grid)
    # NaN grid entries (FP8 NaN codes, never emitted) become 0 so a table read can never poison a sum.
    table = torch.tensor([0.0 if math.isnan(v) else v for v in grid], dtype=torch.float32, device=codes.device)
    return KernelWeight(qweight.contiguous(), params, table, n, k, bits, group_size, mode, decode, v_off)


def unpack(kw: KernelWeight) -> torch.Tensor:
    """Codes (N, K) uint8 back from the kernel layout (reference and tests)."""
    def plane(words: torch.Tensor, width: int) -> torch.Tensor:
        per = 32 // width
        n = words.shape[0]
        shifts = (torch.arange(per, device=words.device, dtype=torch.int32) * width).view(1, 1, per, 1)
        return ((words.view(n, -1, 1, width) >> shifts) & (2 ** width - 1)).reshape(n, -1)

    q, p0 = kw.qweight, kw.plane0_words
    out = torch.empty(kw.N, kw.K, dtype=torch.uint8, device=q.device)
    for r in row_blocks(kw.N, kw.Kp):  # int32 temporaries of a block only (saving from the GPU layout)
        c = plane(q[r, :p0], 2) | (plane(q[r, p0:], 1) << 2) if kw.bits == 3 else plane(q[r], kw.bits)
        out[r] = c[:, :kw.K]
    return out
