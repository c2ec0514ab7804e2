"""Bit packing of codes and the storage layout of a quantized linear layer (format_version 2).

Packed codes
------------
``pack_codes(codes, bits)``: ``codes`` is uint8 ``(..., K)`` with values ``< 2**bits``; the result is
int32 ``(..., ceil(K / per_word))`` with ``per_word = 32 // bits`` codes per word (2 bits: 16, 3 bits: 10,
4 bits: 8, 8 bits: 4). Code ``k`` sits in word ``k // per_word`` at bits
``[(k % per_word) * bits, (k % per_word + 1) * bits)``, least significant first; unused high bits
(3 bits: bits 30-31) and the codes past ``K`` in the last word are 0. Words are stored as int32 (two's
complement: a word whose bit 31 is set is negative), so ``(word >> shift) & (2**bits - 1)`` extracts a code
with either an arithmetic or a logical shift. Codes never straddle a word.

QuantLinear tensors (``out_features = N``, ``in_features = K``, group size ``g``)
---------------------------------------------------------------------------------
Groups run along ``K`` in order: group ``j`` covers columns ``[j*g, min((j+1)*g, K))``; ``n_groups = ceil(K / g)``;
when ``g`` does not divide ``K`` the last group is shorter (no padding is stored). Per-channel means ``g = K``.

``qweight``     int32 ``(N, ceil(K / per_word))``: ``pack_codes`` of the ``(N, K)`` code matrix (row = output).
``scales``      ``(N, n_groups)`` in the scale dtype (float16 by default; bfloat16/float32 allowed):
                the scale of ``sym`` and ``zero_point`` formats.
``zeros``       uint8 ``(N, n_groups)``: integer zero points (``zero_point`` formats only).
``scales_pos``, ``scales_neg``  ``(N, n_groups)``: AFPQ's two scales (``two_scale`` formats only).
``bias``        float ``(N,)`` when the original layer had one.

Weight ``W[n, k]`` = ``formats.decode(fmt, code[n, k], {p: tensor[n, k // g]})``; see :mod:`hf_efficient.formats`
for the scale rules. Which format a layer uses is recorded in the checkpoint's ``quantization_config``.

Load guards (format_version 2)
------------------------------
transformers without ``import hf_efficient`` does not know our ``quant_method``: it only warns, builds plain
``nn.Linear`` layers, drops the packed tensors as "unexpected" and initialises every weight at random (a
model with perplexity ~5e16, no error). A version-2 checkpoint therefore also stores, per quantized layer,
``<layer>.weight`` = uint8 ``[FORMAT_VERSION]`` (shape ``(1,)``, :data:`GUARD_TENSOR`), which a plain
``nn.Linear`` cannot accept: vanilla loading stops with a size-mismatch ``RuntimeError``, and its load report
lists :data:`GUARD_KEY`, which names the package to import. With the import, the guards are checked and
skipped. Version 1 (no guards) still loads.
"""
from __future__ import annotations

import torch

from ..blocks import row_blocks

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
GUARD_TENSOR = "weight"
GUARD_KEY = "hf_efficient.requires__pip_install_hf_efficient__then__import_hf_efficient"
SUPPORTED_BITS = (2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 32 // bits


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words holding ``k`` codes."""
    per = codes_per_word(bits)
    return (k + per - 1) // per


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``(..., K)`` into int32 words ``(..., ceil(K / (32 // bits)))`` (layout above)."""
    per = codes_per_word(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes must be < 2**{bits} = {2 ** bits}, got a code {int(codes.max())}")
    k = codes.shape[-1]
    words = packed_width(k, bits)
    rows = codes.reshape(-1, k)
    out = torch.empty(rows.shape[0], words, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    for r in row_blocks(rows.shape[0], words * per):  # int64 temporaries of a block, not 8 bytes per code at once
        padded = torch.zeros(r.stop - r.start, words * per, dtype=torch.int64, device=codes.device)
        padded[:, :k] = rows[r]
        acc = (padded.view(-1, words, per) << shifts).sum(-1)
        # Wrap into int32 two's complement explicitly (an out-of-range int64->int32 cast is not defined behaviour).
        out[r] = torch.where(acc >= 2 ** 31, acc - 2 ** 32, acc)
    return out.view(*codes.shape[:-1], words)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``(..., W)`` -> uint8 ``(..., k)``."""
    per = codes_per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    if packed.shape[-1] != packed_width(k, bits):
        raise ValueError(f"packed width {packed.shape[-1]} does not hold k={k} codes of {bits} bits "
                         f"(expected {packed_width(k, bits)} words)")
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    words = packed.reshape(-1, packed.shape[-1])
    out = torch.empty(words.shape[0], k, dtype=torch.uint8, device=packed.device)
    for r in row_blocks(words.shape[0], words.shape[1] * per):  # int32 temporaries of a block only
        out[r] = ((words[r].unsqueeze(-1) >> shifts) & (2 ** bits - 1)).reshape(r.stop - r.start, -1)[:, :k]
    return out.view(*packed.shape[:-1], k)


def n_groups(k: int, group_size: int) -> int:
    return (k + group_size - 1) // group_size


def group_index(k: int, group_size: int, device=None) -> torch.Tensor:
    """``(k,)`` long: the group of each input column (the last group may be shorter)."""
    return torch.arange(k, device=device) // group_size


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group tensor ``(N, n_groups)`` -> per-column ``(N, k)``."""
    return t.index_select(-1, group_index(k, group_size, t.device))


def guard_tensor() -> torch.Tensor:
    """The ``(1,)`` uint8 tensor stored as each layer's :data:`GUARD_TENSOR` and as :data:`GUARD_KEY`."""
    return torch.tensor([FORMAT_VERSION], dtype=torch.uint8)
