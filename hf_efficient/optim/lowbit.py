"""8-bit block-wise optimizer states for AdamA (plain torch).

Why not torchao's ``OptimState8bit``: with torchao installed, transformers imports it whenever a
model class is imported (seconds per process, and library-load failures and deprecation warnings printed
under torch 2.13; docs/adama.md), which would change every other feature of this package.
So the state format is written here, small and self-contained.

Format (:class:`Q8State`): ``codes`` uint8 with the parameter's shape; ``scale`` fp32, the absmax
of each block of ``block_size`` consecutive elements (flattened; the last block may be short);
and a fixed 256-entry value map shared by all tensors of a kind:

* ``exp_avg`` (signed): 0, and +-absmax * 2**(-k / 16) for k = 0..126 (8 octaves below the block
  absmax, 4.4 % relative spacing: nearest rounding stores a value within 2.2 % of itself);
* ``exp_avg_sq`` (unsigned): 0, and absmax * 2**(-k / 14) for k = 0..254 (18 octaves, 5 %
  spacing, i.e. 1.25 % error on sqrt(v), which is what the update divides by).

(Grids were picked by measurement: coarser/wider grids, e.g. 8 and 10.5 codes per octave, gave
2-3x larger state errors after AdamA's repeated folds; see tests/test_adama_lowbit.py.)

A geometric map keeps the relative error flat where a linear int8 grid would flush the small
second moments of a block to zero. Values below the map's smallest magnitude round to 0 or to it;
AdamA guards the update against a zeroed v (see ``adama._update``).

AdamA re-quantizes m and v after every micro-batch, so rounding errors compound N times per step
(the state error grows with N; measured figures in docs/adama.md).
Stochastic rounding (random numbers from a generator the optimizer owns, never the global RNG) is
unbiased: its instantaneous error is ~1.4x larger, but increments below half a grid step survive in
expectation, and over 500 steps of real text it matched fp32 states' loss (+0.02 %) where nearest
rounding lost 0.8 % (benchmarks/results/adama_convergence.md); it is AdamA's default.

This module is the reference (plain torch, one tensor at a time); on CUDA AdamA folds and updates
these states with the Triton kernels of :mod:`hf_efficient.kernels.adama_q8`, which quantize the same
way (tested against :func:`quantize_blockwise`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

FORMAT = "hf_efficient.Q8State/geometric/v1"
SIGNED_OCTAVES_PER_CODE = 1 / 16
UNSIGNED_OCTAVES_PER_CODE = 1 / 14


@lru_cache(maxsize=None)
def _value_map_cpu(signed: bool) -> torch.Tensor:
    if signed:
        mags = torch.tensor([2.0 ** (-k * SIGNED_OCTAVES_PER_CODE) for k in range(127)], dtype=torch.float64)
        vals = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags.flip(0)])  # 255 values, sorted
    else:
        mags = torch.tensor([2.0 ** (-k * UNSIGNED_OCTAVES_PER_CODE) for k in range(255)], dtype=torch.float64)
        vals = torch.cat([torch.zeros(1, dtype=torch.float64), mags.flip(0)])  # 256 values, sorted
    return vals.float()


_MAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def value_map(signed: bool, device) -> torch.Tensor:
    """The sorted value grid (in units of the block absmax) that codes index into."""
    key = (signed, torch.device(device))
    if key not in _MAPS:
        _MAPS[key] = _value_map_cpu(signed).to(device)
    return _MAPS[key]


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer. ``x`` float (any shape) -> (codes uint8 of x's shape, scale fp32 (n_blocks,)).

    Nearest rounding when ``generator`` is None, else stochastic (unbiased between the two neighbours).
    Raises ValueError for negative values when ``signed`` is False.
    """
    x = x.float()
    if not signed and bool((x < 0).any()):
        raise ValueError("quantize_blockwise: unsigned state with negative values")
    blocks = _blocks(x, block_size)
    scale = blocks.abs().amax(dim=1).clamp_min(1e-30)
    y = (blocks / scale[:, None]).reshape(-1)[: x.numel()]
    grid = value_map(signed, x.device)
    hi = torch.searchsorted(grid, y).clamp_(1, grid.numel() - 1)  # grid[hi-1] < y <= grid[hi]
    lo = hi - 1
    g_lo, g_hi = grid[lo], grid[hi]
    frac = ((y - g_lo) / (g_hi - g_lo)).clamp_(0, 1)
    if generator is None:
        up = frac >= 0.5
    else:
        up = torch.rand(y.shape, device=y.device, generator=generator) < frac
    codes = torch.where(up, hi, lo).to(torch.uint8).view(x.shape)
    return codes, scale


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
    """(codes, scale) -> fp32 tensor of codes' shape."""
    vals = value_map(signed, codes.device)[codes.reshape(-1).long()]
    n = vals.numel()
    pad = (-n) % block_size
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    return (vals.view(-1, block_size) * scale[:, None]).reshape(-1)[:n].view(codes.shape)


CHUNK = 1 << 20  # elements per (de)quantization pass: bounds the fp32/int64 temporaries of one tensor


@dataclass
class Q8State:
    """An 8-bit block-wise quantized optimizer state (see the module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor
    signed: bool
    block_size: int

    @classmethod
    def zeros(cls, like: torch.Tensor, signed: bool, block_size: int) -> "Q8State":
        n_blocks = math.ceil(like.numel() / block_size)
        zero_code = 127 if signed else 0  # the grid's 0.0
        codes = torch.full(like.shape, zero_code, dtype=torch.uint8, device=like.device)
        return cls(codes, torch.zeros(n_blocks, device=like.device), signed, block_size)

    def chunks(self):
        """Block-aligned (start, end) element ranges of at most ~CHUNK elements."""
        step = max(self.block_size, CHUNK // self.block_size * self.block_size)
        n = self.codes.numel()
        return [(s, min(s + step, n)) for s in range(0, n, step)]

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """fp32 values of flattened elements [start, end) (start block-aligned); all, in shape, by default."""
        if end is None and start == 0:
            return self.dequantize(0, self.codes.numel()).view(self.codes.shape)
        b0, b1 = start // self.block_size, math.ceil(end / self.block_size)
        return dequantize_blockwise(self.codes.view(-1)[start:end], self.scale[b0:b1], self.signed, self.block_size)

    def store(self, x: torch.Tensor, generator: torch.Generator | None = None, start: int = 0) -> None:
        """Quantize fp32 ``x`` into flattened elements [start, start + x.numel()) (start block-aligned)."""
        end = start + x.numel()
        codes, scale = quantize_blockwise(x.reshape(-1), self.signed, self.block_size, generator)
        self.codes.view(-1)[start:end].copy_(codes)
        self.scale[start // self.block_size: start // self.block_size + scale.numel()].copy_(scale)

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def to_saved(self) -> dict:
        return {"format": FORMAT, "codes": self.codes.clone(), "scale": self.scale.clone(), "signed": self.signed,
                "block_size": self.block_size}

    @classmethod
    def from_saved(cls, d: dict, device) -> "Q8State":
        if d.get("format") != FORMAT:
            raise ValueError(f"AdamA 8-bit state: unknown format {d.get('format')!r}; this version reads {FORMAT!r}")
        return cls(d["codes"].to(device).clone(), d["scale"].to(device).clone(), bool(d["signed"]),
                   int(d["block_size"]))


def quantizable(p: torch.Tensor, min_size: int) -> bool:
    """Small tensors (norm weights, biases) are not worth quantizing and keep fp32 states."""
    return p.numel() >= min_size
