"""Numeric formats as data: one catalog read by every quantizer, packer and kernel.

A :class:`NumericFormat` is a value grid indexed by code (``grid[c]`` is the value of code ``c``,
``len(grid) == 2**bits``) plus a *scale scheme* saying how a group of weights maps onto the grid:

``"sym"``        one scale per group, ``s = absmax(w) / min(max(grid), -min(grid))``;
                 ``value = grid[c] * s``. (INTn-sym, FP4/FP3/NF4/NF3/FP8 symmetric.)
``"zero_point"`` INT asymmetric: unsigned grid ``0 .. 2**bits-1``, one scale and one *integer* zero point
                 per group: ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``s = (hi - lo) / (2**bits - 1)``,
                 ``z = clamp(round(-lo / s), 0, 2**bits - 1)``; ``value = (grid[c] - z) * s``. The range always
                 contains 0, so 0 is exactly representable (as GPTQ does).
``"two_scale"``  AFPQ asymmetric FP/NF: two scales per group, ``s_pos = max(w, 0) / max(grid)`` and
                 ``s_neg = -min(w, 0) / -min(grid)``; a code whose grid value is negative is decoded with
                 ``s_neg``, every other code with ``s_pos``: ``value = grid[c] * (s_neg if grid[c] < 0 else s_pos)``
                 (:attr:`NumericFormat.negative_codes`). Encoding picks the nearest of those values.

Each scheme is a row of :data:`hf_efficient.schemes.SCHEMES` (:attr:`NumericFormat.scale_scheme`), which names
the per-group tensors a layer stores (:attr:`NumericFormat.param_names`: ``scales`` | ``scales`` + ``zeros`` |
``scales_pos`` + ``scales_neg``), their storage dtypes, the kernels' mode and the decode rule. A scale of 0
(an all-zero half or group) is legal: every code then decodes to exactly 0, and encoding never divides by it.

Encoding is round-to-nearest over the distinct valid grid values (ties go to the smaller value).
FP formats are sign-magnitude (the top bit of a code is the sign), so ``-0`` has a code; encoding
always emits the ``+0`` code. FP8-E4M3 (the ``e4m3fn`` variant, max 448) has two NaN codes
(0x7F, 0xFF) whose grid entry is NaN; encoding never emits them.

This module imports only torch so kernels can read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .schemes import SCHEMES, Scheme

KINDS = ("int", "fp", "nf")

# QLoRA's NF4 table and the NF3 table of the AFPQ paper (normal-distribution quantiles, max 1).
NF4_GRID = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
NF3_GRID = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
            0.6229856610298157, 1.0)


def _sign_magnitude(magnitudes: tuple[float, ...]) -> tuple[float, ...]:
    """Codes 0..n-1 are +magnitudes, n..2n-1 the same magnitudes negated (top bit = sign)."""
    return tuple(float(m) for m in magnitudes) + tuple(-float(m) for m in magnitudes)


def _fp_magnitudes(exp_bits: int, man_bits: int, bias: int) -> tuple[float, ...]:
    """Magnitudes of an IEEE-like minifloat without inf (subnormals at exponent 0), by code."""
    out = []
    for e in range(2 ** exp_bits):
        for m in range(2 ** man_bits):
            frac = m / 2 ** man_bits
            out.append((frac if e == 0 else 1.0 + frac) * 2.0 ** ((e if e else 1) - bias))
    return tuple(out)


def _fp8_e4m3fn_grid() -> tuple[float, ...]:
    mags = list(_fp_magnitudes(4, 3, 7))
    mags[-1] = math.nan  # S.1111.111 is NaN in e4m3fn; max finite is 448
    return _sign_magnitude(tuple(mags))


@dataclass(frozen=True)
class NumericFormat:
    """One numeric format. ``grid[c]`` is the value of code ``c`` (NaN for codes never emitted)."""

    name: str
    bits: int
    kind: str
    grid: tuple[float, ...] = field(repr=False)
    scheme: str
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {self.scheme!r}")
        if len(self.grid) != 2 ** self.bits:
            raise ValueError(f"format {self.name}: grid has {len(self.grid)} values, expected 2**{self.bits}")

    # --- facts derived from the grid -------------------------------------------------------------
    @property
    def scale_scheme(self) -> Scheme:
        """The :class:`~hf_efficient.schemes.Scheme` row named by :attr:`scheme`."""
        return SCHEMES[self.scheme]

    @property
    def symmetric(self) -> bool:
        """One parameter per group, no offset: the grid is scaled as it is."""
        return len(self.scale_scheme.params) == 1

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the per-group tensors a layer stores for this format."""
        return self.scale_scheme.param_names

    @property
    def valid_codes(self) -> tuple[int, ...]:
        return tuple(c for c, v in enumerate(self.grid) if not math.isnan(v))

    @property
    def max_value(self) -> float:
        return max(self.grid[c] for c in self.valid_codes)

    @property
    def min_value(self) -> float:
        return min(self.grid[c] for c in self.valid_codes)

    @property
    def sym_max(self) -> float:
        """The grid magnitude an absmax scale maps to (largest value reachable on both sides)."""
        return min(self.max_value, -self.min_value)

    @property
    def zero_code(self) -> int:
        """The code encoding emits for 0 (``+0``; for zero-point formats 0 is relative to the zero point)."""
        return next(c for c in self.valid_codes if self.grid[c] == 0.0 and math.copysign(1.0, self.grid[c]) > 0)

    @property
    def negative_codes(self) -> tuple[bool, ...]:
        """Two-scale rule: ``negative_codes[c]`` is True when code ``c`` is decoded with ``s_neg``."""
        return tuple(bool(v < 0) for v in self.grid)

    def values(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The grid as a ``(2**bits,)`` tensor: ``values()[codes]`` decodes codes before scaling."""
        return _values_cached(self, dtype, str(device) if device is not None else "cpu")


@lru_cache(maxsize=None)
def _values_cached(fmt: NumericFormat, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(fmt.grid, dtype=torch.float64).to(dtype=dtype, device=device)


def _build_catalog() -> dict[str, NumericFormat]:
    cat: dict[str, NumericFormat] = {}
    for b in (2, 3, 4, 8):
        half = 2 ** (b - 1)
        cat[f"int{b}_sym"] = NumericFormat(f"int{b}_sym", b, "int", tuple(float(c - half) for c in range(2 ** b)),
                                           "sym", f"INT{b} symmetric (offset binary, code c = c - {half})")
        cat[f"int{b}_asym"] = NumericFormat(f"int{b}_asym", b, "int", tuple(float(c) for c in range(2 ** b)),
                                            "zero_point", f"INT{b} asymmetric (unsigned code, integer zero point)")
    fp_tables = {
        "fp4": (_sign_magnitude((0, 0.5, 1, 1.5, 2, 3, 4, 6)), "FP4-E2M1"),
        "fp3": (_sign_magnitude((0, 1, 2, 4)), "FP3 (E2M0-style, ±{0,1,2,4})"),
        "nf4": (NF4_GRID, "NF4 (normal float)"),
        "nf3": (NF3_GRID, "NF3 (normal float, AFPQ table)"),
    }
    for stem, (grid, desc) in fp_tables.items():
        kind, b = stem[:2], int(stem[2:])
        cat[f"{stem}_sym"] = NumericFormat(f"{stem}_sym", b, kind, grid, "sym", f"{desc}, one absmax scale")
        cat[f"{stem}_asym"] = NumericFormat(f"{stem}_asym", b, kind, grid, "two_scale",
                                            f"{desc}, AFPQ two scales (s_pos, s_neg)")
    cat["fp8_sym"] = NumericFormat("fp8_sym", 8, "fp", _fp8_e4m3fn_grid(), "sym", "FP8-E4M3 (e4m3fn), absmax scale")
    return cat


FORMATS: dict[str, NumericFormat] = _build_catalog()
ALIASES = {"fp8_e4m3": "fp8_sym", "fp8_e4m3_sym": "fp8_sym", "fp4_e2m1": "fp4_sym", "fp4_e2m1_sym": "fp4_sym",
           "fp4_e2m1_asym": "fp4_asym"}


def get_format(name: str | NumericFormat) -> NumericFormat:
    """The format called ``name`` (a :class:`NumericFormat` passes through); ValueError lists the known names."""
    if isinstance(name, NumericFormat):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        raise ValueError(f"unknown numeric format {name!r}; known formats: {sorted(FORMATS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return FORMATS[key]


def format_name(kind: str, bits: int, symmetric: bool) -> str:
    """Catalog name for (kind, bits, symmetric); ValueError if that combination does not exist."""
    if kind not in KINDS:
        raise ValueError(f"fmt must be one of {KINDS}, got {kind!r}")
    name = f"{kind}{bits}_{'sym' if symmetric else 'asym'}"
    if name not in FORMATS:
        have = sorted({(f.kind, f.bits, f.symmetric) for f in FORMATS.values()})
        allowed = ", ".join(f"{k}{b}{'' if s else '-asym'}" for k, b, s in have if k == kind)
        raise ValueError(f"no {'symmetric' if symmetric else 'asymmetric'} {kind.upper()} format with bits={bits}; "
                         f"{kind!r} exists as: {allowed}")
    return name


# ------------------------------------------------------------------------------------------------
# The scale rules (plain torch; the single definition used by RTN, GPTQ, packing tests and kernel
# references). Shapes: ``w`` is (..., G) for fitting, params come back as (...,) float32 tensors.
# ------------------------------------------------------------------------------------------------

def _round_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    # Codes are chosen against the scale as it will be stored, so decode(encode(w)) is what a
    # reloaded checkpoint computes.
    return s.to(scale_dtype).to(torch.float32)


def fit_params(fmt: NumericFormat, w: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> dict:
    """Per-group parameters for groups along the last dim of ``w`` (..., G) -> {name: (...,) float32}."""
    w = w.float()
    sch = fmt.scale_scheme
    if not (sch.offset or sch.split_sign):
        return sch.from_kernel(_round_scale(w.abs().amax(-1) / fmt.sym_max, scale_dtype), None)
    hi = w.amax(-1).clamp(min=0)
    lo = w.amin(-1).clamp(max=0)
    if sch.split_sign:
        return sch.from_kernel(_round_scale(hi / fmt.max_value, scale_dtype),
                               _round_scale(-lo / -fmt.min_value, scale_dtype))
    qmax = 2 ** fmt.bits - 1
    s = _round_scale((hi - lo) / qmax, scale_dtype)
    z = torch.where(s > 0, torch.round(-lo / torch.where(s > 0, s, 1.0)), torch.zeros_like(s)).clamp(0, qmax)
    return sch.from_kernel(s, z)


@lru_cache(maxsize=None)
def _nearest_table(fmt: NumericFormat, side: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Sorted distinct values and their codes; side 'all', 'pos' (>= 0) or 'neg' (< 0, plus the zero code)."""
    by_value: dict[float, int] = {}
    for c in fmt.valid_codes:
        v = fmt.grid[c]
        if side == "pos" and v < 0 or side == "neg" and v > 0:
            continue
        if v == 0.0:
            c = fmt.zero_code
        by_value.setdefault(v, c)
    vals = sorted(by_value)
    return tuple(vals), tuple(by_value[v] for v in vals)


def _nearest_codes(fmt: NumericFormat, x: torch.Tensor, side: str = "all") -> torch.Tensor:
    vals, codes = _nearest_table(fmt, side)
    v = torch.tensor(vals, dtype=torch.float32, device=x.device)
    mid = (v[1:] + v[:-1]) / 2
    idx = torch.searchsorted(mid, x.contiguous())
    return torch.tensor(codes, dtype=torch.uint8, device=x.device)[idx]


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def encode(fmt: NumericFormat, w: torch.Tensor, params: dict) -> torch.Tensor:
    """Codes (uint8, shape of ``w``) of ``w`` under ``params`` (each broadcastable to ``w``)."""
    w = w.float()
    sch = fmt.scale_scheme
    a, b = sch.kernel_ab(params)
    if sch.offset:
        return _nearest_codes(fmt, w / _safe(a) + b)
    if not sch.split_sign:
        return _nearest_codes(fmt, w / _safe(a))
    pos = _nearest_codes(fmt, (w / _safe(a)).clamp(min=0), "pos")
    neg = _nearest_codes(fmt, (w / _safe(b)).clamp(max=0), "neg")
    return torch.where(w < 0, neg, pos)


def decode(fmt: NumericFormat, codes: torch.Tensor, params: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of ``codes`` under ``params`` (each broadcastable to ``codes``), computed in float32."""
    v = fmt.values(torch.float32, codes.device)[codes.long()]
    a, b = fmt.scale_scheme.kernel_ab(params)
    return fmt.scale_scheme.apply(v, a.float(), None if b is None else b.float()).to(dtype)


def fake_quantize(fmt: NumericFormat, w: torch.Tensor, params: dict) -> torch.Tensor:
    """``decode(encode(w))`` in ``w``'s dtype."""
    return decode(fmt, encode(fmt, w, params), params, w.dtype)


def quantize_per_token(fmt: NumericFormat, x: torch.Tensor) -> torch.Tensor:
    """Dynamic fake quantization of activations, one scale per row of the last dim (W8A8's activations).

    The scale is kept in float32 (computed at run time, never stored).
    """
    params = {k: v[..., None] for k, v in fit_params(fmt, x, torch.float32).items()}
    return fake_quantize(fmt, x, params)
