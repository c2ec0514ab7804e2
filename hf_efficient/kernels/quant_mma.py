"""Mixed-input tensor-core matmul for 2/3/4-bit weights of every format (CUDA C++, ``cuda/quant_mma.cuh``).

The kernel runs ``mma.sync.m16n8k16`` with the weight as the A operand, so one weight tile feeds up to 8 rows
of activations per MMA (decode, M = 1..8) and more rows cost more MMAs, not more weight traffic. This module
owns its weight layout (built once per layer, the layer's only copy on the GPU), the inverse of that layout
(checkpoints stay in the stored layout), a plain-torch reference of what the kernel computes (the CPU tests'
oracle), the JIT build of the extension (only where CUDA and ``nvcc`` exist), a CPU build of the same kernel code
under a CUDA emulation for the tests (:func:`emulation`, :func:`quant_mma_emulated`) and the split-K choice.

**The mma layout.** ``N`` is padded to ``Ntiles * 16`` rows and ``K`` to ``KB * 128`` (zero codes; zero scales
for the padded rows and groups, zero activations for the padded K, so padding adds nothing).

``qweight``  int32 ``(Ntiles, KB, 16, 4, CW)``: the *chunk* of row ``r`` of a tile, 128-K block ``kb`` and
             thread-quad ``q`` holds the 32 codes ``k = kb*128 + 16*s + 8*h + 2*q + e`` (slice ``s`` < 8,
             half ``h`` < 2, element ``e`` < 2) as 16 *pairs* ``p = 2*s + h`` of the codes ``(e=0, e=1)`` — the
             K pairs of an m16n8k16 A fragment. 4 bits: pair ``p`` is byte ``p`` (low nibble ``e=0``); 2 bits:
             nibble ``p``; 3 bits: bits ``6p .. 6p+5`` of the chunk's 96 bits (word 0 low), ``e=0`` low - so
             the chunk is its 32 codes as consecutive 3-bit fields. ``CW`` = 4, 2, 3 words. A warp's chunk
             loads for one block are 2 contiguous runs of ``16 * 4 * CW * 4`` bytes (rows 0-7 and 8-15).
``params``   ``(Ntiles, NG, 16, 2)``, NG = ``ceil(KB*128 / group)``: ``[..., 0] = a``, ``[..., 1] = b`` per
             (row, group) as in :mod:`hf_efficient.kernels.quant_layout` (sym: b unused; zero point: b = z, an
             integer of magnitude <= 128 with an integer grid, :func:`zero_point_foldable`; two scales: a = s_pos,
             b = s_neg); float16 when the stored scales are float16, else float32.
``tables``   int32 ``(2, 4**bits)``: for activation dtype float16 (row 0) and bfloat16 (row 1), entry ``i``
             (a pair index) holds the two grid values ``(v[c0], v[c1])`` as a half2/bfloat162 bit pattern.
             ``(1, 4**bits)`` (the float16 row only) for the 4-bit identity grid ``v = c`` with a zero point
             (INT4-asym): with bfloat16 activations the kernel builds those pairs by arithmetic
             (:func:`int_decode`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from ..blocks import BLOCK_ELEMENTS, row_blocks
from ..schemes import MODES, scheme_of_mode
from .quant_layout import check_weight_args

logger = logging.getLogger(__name__)

MMA_BITS = (2, 3, 4)
BLOCK_K = 128
WARPS = 8  # = hfe_mma::WARPS (16-row tiles per CTA)
CHUNK_WORDS = {2: 2, 3: 3, 4: 4}
_SRC = Path(__file__).resolve().parent / "cuda"


@dataclass
class MmaWeight:
    """A weight in the mma layout (module docstring); ``N`` x ``K`` logical shape."""

    qweight: torch.Tensor
    params: torch.Tensor
    tables: torch.Tensor
    N: int
    K: int
    bits: int
    group_size: int
    mode: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.params, self.tables))


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------

def _pair_codes(idx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two codes ``(c0, c1)`` a pair index stands for (the pair's field in a chunk: ``c0 | c1 << bits``)."""
    return idx & (2 ** bits - 1), idx >> bits


def pair_tables(grid, bits: int, device=None) -> torch.Tensor:
    """int32 ``(2, 4**bits)``: pair entries for float16 (row 0) and bfloat16 (row 1) activations."""
    idx = torch.arange(4 ** bits)
    c0, c1 = _pair_codes(idx, bits)
    g = torch.tensor([0.0 if v != v else float(v) for v in grid], dtype=torch.float64)  # NaN codes never occur
    rows = []
    for dt in (torch.float16, torch.bfloat16):
        lo = g[c0].to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
        hi = g[c1].to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
        rows.append((lo | (hi << 16)).to(torch.int32))  # wraps to two's complement like the kernel's uint32
    return torch.stack(rows).to(device)


def int_decode(grid, bits: int, mode: int) -> bool:
    """Whether the kernel decodes this format without a table at bfloat16: 4-bit codes that are their own values
    (``v = c``) with a zero point, whose term removes the constant the arithmetic decode adds (``IntDecode`` in
    cuda/quant_mma.cuh, which says why float16 keeps the table)."""
    return bits == 4 and scheme_of_mode(mode).offset and all(
        float(v) == c for c, v in enumerate(grid))


FOLD_BOUND = 128  # |grid value| and |zero point| at most this: every v - z is a float16/bfloat16 integer


def zero_point_foldable(grid) -> bool:
    """Whether a zero-point format's grid lets the kernel fold zero points into its fragments (``FOLD`` in
    cuda/quant_mma.cuh: at two or more M tiles each A register becomes ``v - z`` by one subtraction, exact when
    every grid value is an integer of magnitude <= :data:`FOLD_BOUND` and so is every zero point)."""
    return all(float(v).is_integer() and abs(float(v)) <= FOLD_BOUND for v in grid)


def _check_foldable(b: torch.Tensor, grid) -> None:
    if not zero_point_foldable(grid):
        raise ValueError(f"the mma kernel runs zero-point weights only with integer grid values in [-{FOLD_BOUND}, "
                         f"{FOLD_BOUND}] (it folds the zero point into each fragment), got grid {list(grid)}")
    if b.numel() and (b.abs().max() > FOLD_BOUND or (b != b.round()).any()):
        raise ValueError(f"the mma kernel runs zero-point weights only with integer zero points in [-{FOLD_BOUND}, "
                         f"{FOLD_BOUND}] (it folds them into each fragment), got values in "
                         f"[{b.min().item():g}, {b.max().item():g}]"
                         + ("" if (b == b.round()).all() else ", not all integers"))


def _words(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``(..., F)`` fields of ``width`` bits (F * width a multiple of 32) into int32 ``(..., F*width/32)``."""
    per = 32 // width
    f = fields.to(torch.int64).reshape(*fields.shape[:-1], -1, per)
    shifts = torch.arange(per, device=fields.device, dtype=torch.int64) * width
    w = (f << shifts).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def _unwords(words: torch.Tensor, width: int) -> torch.Tensor:
    per = 32 // width
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * width
    return ((words.unsqueeze(-1) >> shifts) & (2 ** width - 1)).reshape(*words.shape[:-1], -1)


def pack(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, grid, bits: int, group_size: int,
         mode: int) -> MmaWeight:
    """Codes uint8 ``(N, K)`` and per-group ``a``/``b`` ``(N, ceil(K / group_size))`` -> :class:`MmaWeight`."""
    n, k, ng = check_weight_args(codes, a, b, grid, bits, group_size, mode, MMA_BITS, 16, "the mma kernel")
    if scheme_of_mode(mode).offset:
        _check_foldable(a if b is None else b, grid)  # as stored below: no b means b = a
    nt, kb = -(-n // 16), -(-k // BLOCK_K)
    ngp = -(-kb * BLOCK_K // group_size)
    qw = torch.empty(nt, kb, 16, 4, bits, dtype=torch.int32, device=codes.device)
    # int64 temporaries of a block of 16-row tiles (whole-matrix ones set the GPU's peak at load); the 3-bit path
    # widens each code to three int64 bits, so its blocks are smaller
    for r in row_blocks(nt, 16 * kb * BLOCK_K, BLOCK_ELEMENTS // (4 if bits == 3 else 1)):
        tiles, src = r.stop - r.start, codes[16 * r.start:16 * r.stop]
        c = torch.zeros(tiles * 16, kb * BLOCK_K, dtype=torch.int64, device=codes.device)
        c[:src.shape[0], :k] = src
        # (tile, r, kb, s, h, q, e) -> (tile, kb, r, q, s, h, e): chunk (tile, kb, r, q) lists pairs p = 2s + h
        c = c.view(tiles, 16, kb, 8, 2, 4, 2).permute(0, 2, 1, 5, 3, 4, 6).reshape(tiles, kb, 16, 4, 16, 2)
        c0, c1 = c[..., 0], c[..., 1]
        if bits == 4:
            qw[r] = _words(c0 | (c1 << 4), 8)
        elif bits == 2:
            qw[r] = _words(c0 | (c1 << 2), 4)
        else:  # the 32 codes as 3-bit fields, bit by bit into 3 words
            f = torch.stack([c0, c1], -1).flatten(-2)
            qw[r] = _words(((f[..., None] >> torch.arange(3, device=f.device)) & 1).flatten(-2), 1)
    pdt = torch.float16 if a.dtype == torch.float16 else torch.float32
    p = torch.zeros(nt * 16, ngp, 2, dtype=pdt, device=codes.device)
    p[:n, :ng, 0] = a.to(pdt)
    p[:n, :ng, 1] = (a if b is None else b).to(pdt)
    p = p.view(nt, 16, ngp, 2).permute(0, 2, 1, 3).contiguous()
    tables = pair_tables(grid, bits, codes.device)
    if int_decode(grid, bits, mode):
        tables = tables[:1].contiguous()  # bfloat16 decodes by arithmetic
    return MmaWeight(qw, p, tables, n, k, bits, group_size, mode)


def unpack(w: MmaWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes uint8 (N, K), a (N, n_groups), b (N, n_groups))`` back from the layout (params as stored here)."""
    nt, kb = w.qweight.shape[:2]
    if w.bits == 4:
        f = _unwords(w.qweight, 8)
        c0, c1 = f & 15, f >> 4
    elif w.bits == 2:
        f = _unwords(w.qweight, 4)
        c0, c1 = f & 3, f >> 2
    else:
        bit = _unwords(w.qweight, 1).view(*w.qweight.shape[:-1], 16, 2, 3)
        f = (bit << torch.arange(3, device=bit.device, dtype=bit.dtype)).sum(-1)
        c0, c1 = f[..., 0], f[..., 1]
    c = torch.stack([c0, c1], -1).view(nt, kb, 16, 4, 8, 2, 2).permute(0, 2, 1, 4, 5, 3, 6)
    codes = c.reshape(nt * 16, kb * BLOCK_K)[:w.N, :w.K].to(torch.uint8).contiguous()
    ng = -(-w.K // w.group_size)
    p = w.params.permute(0, 2, 1, 3).reshape(nt * 16, -1, 2)[:w.N, :ng]
    return codes, p[..., 0].contiguous(), p[..., 1].contiguous()


def grid_values(w: MmaWeight, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``(2**bits,)``: each code's grid value as the kernel's fragments hold it (the pair tables' entries,
    rounded to the activation dtype)."""
    row = 0 if dtype == torch.float16 else 1
    if row >= w.tables.shape[0]:  # the identity grid at bfloat16 (int_decode): codes 0..15 are exact
        return torch.arange(16, dtype=torch.float32, device=w.tables.device)
    idx = torch.arange(2 ** w.bits, device=w.tables.device)
    # entries whose pair is (c, 0), index c: their low half is v[c] in the activation dtype
    lo = (w.tables[row, idx] & 0xFFFF).to(torch.int16)
    return lo.view(torch.float16 if dtype == torch.float16 else torch.bfloat16).float()


def dequantize_reference(w: MmaWeight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The float32 ``(N, K)`` weight the kernel multiplies by: grid values rounded to the activation dtype (the
    pair tables), times the per-group rule in float32."""
    codes, a, b = unpack(w)
    v = grid_values(w, dtype)[codes.long()]
    gi = torch.arange(w.K, device=codes.device) // w.group_size
    return scheme_of_mode(w.mode).apply(v, a.float()[:, gi], b.float()[:, gi])


def dequantize(w: MmaWeight, dtype: torch.dtype, block_elements: int = 2 ** 24) -> torch.Tensor:
    """The ``(N, K)`` weight of :func:`dequantize_reference`, rounded once to ``dtype`` (prompts on the mma layout
    run cuBLAS on it): on CUDA by the Triton dequantizer, elsewhere a block of row tiles at a time (no
    whole-matrix integer temporaries)."""
    if w.qweight.is_cuda:
        from .quant_mma_dequant import dequantize_triton

        return dequantize_triton(w, grid_values(w, dtype), dtype)
    out = torch.empty(w.N, w.K, dtype=dtype, device=w.qweight.device)
    for r in row_blocks(w.qweight.shape[0], 16 * w.qweight.shape[1] * BLOCK_K, block_elements):
        lo, hi = 16 * r.start, min(16 * r.stop, w.N)
        sub = dataclasses.replace(w, qweight=w.qweight[r], params=w.params[r], N=hi - lo)
        out[lo:hi] = dequantize_reference(sub, dtype)
    return out


# ------------------------------------------------------------------------------------------------
# The extension: built on first use where CUDA and nvcc exist
# ------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_ext = None
_ext_error: str | None = None
_emu = None
_counters: dict[str, torch.Tensor] = {}


def _source_hash() -> str:
    h = hashlib.sha1()
    for f in sorted(_SRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` only if ``path`` holds something else: a rewrite with a new mtime makes ninja relink a
    library that another process may have loaded."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build(name: str, suffix: str, cflags: list[str], cuda_cflags: list[str] | None = None):
    """Compile the binding and the 9 ``launch<bits, mode>`` instantiations (one translation unit each, so they build
    in parallel) into a cached extension named for the sources' hash."""
    import fcntl  # POSIX: the CUDA build and the CPU emulation both run on Linux

    from torch.utils.cpp_extension import load

    tag = _source_hash()
    build = Path(os.environ.get("HF_EFFICIENT_CACHE", Path.home() / ".cache" / "hf_efficient")) / f"{name}_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    # Other processes (pytest -n 8, several ranks) build into the same directory: hold a file lock over writing the
    # sources, building and loading, so none sees a half-written file or a library that ninja is relinking under it.
    with open(build / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        sources = [str(_SRC / "quant_mma_binding.cpp")]
        for bits in MMA_BITS:
            for mode in MODES:  # = the MODE_* constants of cuda/quant_mma_args.h (tests check)
                f = build / f"inst_b{bits}_m{mode}.{suffix}"
                _write_if_changed(f, f'#include "{_SRC / "quant_mma.cuh"}"\n'
                                     f"template void hfe_mma::launch<{bits}, {mode}>(const hfe_mma::Args&);\n")
                sources.append(str(f))
        return load(name=f"hfe_{name}_{tag}", sources=sources, build_directory=str(build),
                    extra_include_paths=[str(_SRC)], verbose=False, extra_cflags=cflags,
                    extra_cuda_cflags=cuda_cflags)


def extension():
    """The compiled extension, or None (with the reason logged once) where it cannot be built."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        if not torch.cuda.is_available() or os.environ.get("HF_EFFICIENT_NO_CUDA_EXT") == "1":
            _ext_error = "no CUDA device (or HF_EFFICIENT_NO_CUDA_EXT=1)"
            return None
        if torch.cuda.get_device_capability() < (8, 0):
            _ext_error = "the mma kernel needs compute capability >= 8.0"
            return None
        try:
            major, minor = torch.cuda.get_device_capability()
            _ext = _build("quant_mma", "cu", ["-O3"], ["-O3", "-std=c++17",
                                                       f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
        except Exception as e:  # noqa: BLE001 - any build failure means "use the Triton kernels"
            _ext_error = f"{type(e).__name__}: {e}"
            logger.warning("hf_efficient: the CUDA mma kernel could not be built (%s); using the Triton kernels",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _ext


def emulation():
    """The kernel's own CUDA code built for the CPU (``-DHFE_MMA_EMULATE``: ``cuda/quant_mma_emu.h`` stands in for
    CUDA), so the tests run it where there is no GPU. Every CUDA thread is a fiber, so it is slow (use small shapes);
    it reports barrier and collective misuse, reads before a cp.async lands, shared memory read before it is written
    (it starts as NaN) and out-of-bounds shared accesses as errors. Built on first use with the host compiler
    (raises if that fails: this is a test tool, not a fallback)."""
    global _emu
    with _lock:
        if _emu is None:
            # -fno-strict-aliasing: the kernel reinterprets registers between half2, uint32 and float, as CUDA code does
            _emu = _build("quant_mma_emu", "cpp", ["-O2", "-std=c++17", "-fno-strict-aliasing", "-DHFE_MMA_EMULATE",
                                                   "-Wno-unknown-pragmas"])
        return _emu


def unavailable_reason() -> str | None:
    extension()
    return _ext_error


# CTAs of the kernel resident per SM by M tiles per CTA (``mtiles_for`` in cuda/quant_mma_args.h) and bits: its
# __launch_bounds__ (registers) allow 4 for decode (one M tile; 3 at 4 bits, where shared memory - pair table
# 128 * 4**bits bytes + weight ring + x stage, launch_typed in cuda/quant_mma.cuh - allows no more, so the
# registers go to the kernel instead), 2 for two M tiles, 1 for eight.
RESIDENT_CTAS = {1: {2: 4, 3: 4, 4: 3}, 2: {2: 2, 3: 2, 4: 2}, 8: {2: 1, 3: 1, 4: 1}}
# The split-K model (choose_splits), fitted to same-run sweeps of every split (round 5 on an H200, round 9 on an H100)
# (benchmarks/results/quant_mma_splits.md; tests/test_quant_mma.py checks the model against it): a CTA's block
# takes (j + 1) / 2 times as long with j CTAs resident on its SM as alone (co-resident CTAs hide each other's
# latencies); a CTA also costs CTA_FIXED_BLOCKS blocks of weight work (pair-table fill, x staging) per wave, and
# each split SPLIT_REDUCE_BLOCKS (its partial tile written, counted and summed) per 16 rows of its CTA (at least one):
# a 64-row partial is four times a 16-row one (refitted to the sweep of round 9 on an H100, with 64-row cases).
CTA_FIXED_BLOCKS = 2
SPLIT_REDUCE_BLOCKS = 0.75


def mtiles_for(m: int) -> int:
    return 1 if m <= 8 else 2 if m <= 16 else 8


def scales_fragments(m: int, bf16: bool, group_size: int) -> bool:
    """Whether the kernel scales the A fragments before the MMAs (SCALE_A in cuda/quant_mma.cuh: bfloat16, more than
    one M tile, groups of whole blocks). There each weight is bf16(bf16(v) * bf16(scale)): besides the grid value's
    rounding, the scale and the product are rounded to bfloat16 (the kernel's output equals that model exactly,
    tests/test_quant_mma.py), so error bounds grant (1 + u)**3 - 1 of |w| per weight instead of u."""
    return bf16 and mtiles_for(m) > 1 and group_size % BLOCK_K == 0


def tiles_per_warp(m: int, bf16: bool, group_size: int) -> int:
    """16-row tiles of W per warp (= ``tiles_per_warp`` in cuda/quant_mma_args.h): two on the scaled-A path at 8 M
    tiles, else one."""
    return 2 if mtiles_for(m) == 8 and scales_fragments(m, bf16, group_size) else 1


def grid_ctas(m: int, n: int, nt: int = 1) -> int:
    """CTAs of one split: row CTAs of ``WARPS * nt`` 16-row tiles x CTAs along M (launch_typed's grid x and z); also
    the split-K counters a call needs."""
    return -(-(-(-n // 16)) // (WARPS * nt)) * -(-m // (8 * mtiles_for(m)))


def resident_ctas(m: int, bits: int, int_decode: bool = False) -> int:
    """CTAs per SM (:data:`RESIDENT_CTAS`); 4-bit decode without a pair table (``int_decode``) has the shared memory
    for 4, and its ``__launch_bounds__`` ask for 4."""
    mt = mtiles_for(m)
    return 4 if int_decode and mt == 1 else RESIDENT_CTAS[mt][bits]


def choose_splits(m: int, n: int, k: int, sms: int, bits: int = 4, int_decode: bool = False, nt: int = 1) -> int:
    """Split-K factor minimising the modelled time (the constants above): waves of CTAs x (blocks per CTA x the
    slowdown of the CTAs sharing an SM + a CTA's fixed cost), plus the reduction's cost per split. A grid just over
    a whole number of waves costs a whole extra wave, and more CTAs per SM are not free, so more splits are not
    always better. ``nt`` tiles per warp (:func:`tiles_per_warp`) count as ``nt`` times a block's work (the model
    was fitted at one)."""
    kb = -(-k // BLOCK_K)
    ctas = grid_ctas(m, n, nt)
    resident = resident_ctas(m, bits, int_decode)
    slots = sms * resident
    reduce = SPLIT_REDUCE_BLOCKS * max(1, mtiles_for(m) // 2)

    def cost(s: int) -> float:
        per = -(-kb // s)
        launched = -(-kb // per)  # the binding launches ceil(KB / blocks per split) splits
        grid = ctas * launched
        per_sm = min(resident, -(-min(grid, slots) // sms))
        return -(-grid // slots) * (per * nt * (per_sm + 1) / 2 + CTA_FIXED_BLOCKS) + reduce * launched
    return min(range(1, max(1, kb // 2) + 1), key=lambda s: (cost(s), s))


def launch_plan(m: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype, table_rows: int,
                sms: int, splits: int = 0) -> tuple[int, int]:
    """The split-K factor (``splits`` if given, else chosen for ``m`` rows of ``dtype`` activations on ``sms`` SMs)
    and the tiles per warp the kernel launches for a weight whose ``tables`` have ``table_rows`` rows (none for
    ``dtype``'s row: IntDecode, which packs more CTAs per SM at one M tile and so splits differently)."""
    bf16 = dtype == torch.bfloat16
    nt = tiles_per_warp(m, bf16, group_size)
    if not splits:
        splits = choose_splits(m, n, k, sms, bits, int_decode=int(bf16) >= table_rows, nt=nt)
    return splits, nt


def _counter_buffer(device: torch.device, need: int) -> torch.Tensor:
    key = str(device) if device.type != "cuda" or device.index is not None else f"cuda:{torch.cuda.current_device()}"
    buf = _counters.get(key)
    if buf is None or buf.numel() < need:
        # Zeroed once; the kernel's last split resets every counter it used, so it stays zero between calls.
        buf = torch.zeros(max(need, 4096), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def quant_mma(x: torch.Tensor, w: MmaWeight, splits: int | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) float16/bfloat16 on CUDA -> (M, N) in ``x``'s dtype."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the CUDA mma kernel is unavailable: {_ext_error}")
    return ops.quant_mma(x, w.qweight, w.params, w.tables, w.N, w.K, w.bits, w.group_size, w.mode, splits or 0)


@ops.quant_mma.register_kernel("cuda")
def _quant_mma_cuda(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, tables: torch.Tensor, n: int,
                    k: int, bits: int, group_size: int, mode: int, splits: int) -> torch.Tensor:
    """``torch.ops.hf_efficient.quant_mma`` on CUDA: the extension (``splits`` 0 = choose by shape)."""
    sms = 0 if splits else torch.cuda.get_device_properties(x.device).multi_processor_count
    return _run(extension(), x, qweight, params, tables, n, k, bits, group_size, mode, splits, sms)


def quant_mma_emulated(x: torch.Tensor, w: MmaWeight, splits: int | None = None, sms: int = 132) -> torch.Tensor:
    """:func:`quant_mma` for CPU tensors, run by the kernel's own code under :func:`emulation` (``splits`` None:
    chosen as on a GPU of ``sms`` SMs)."""
    return _run(emulation(), x, w.qweight, w.params, w.tables, w.N, w.K, w.bits, w.group_size, w.mode, splits or 0,
                sms)


def _run(ext, x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, tables: torch.Tensor, n: int, k: int,
         bits: int, group_size: int, mode: int, splits: int, sms: int) -> torch.Tensor:
    """Check and prepare the arguments, choose the split (``splits`` 0: for ``sms`` SMs) and call ``ext``'s binding."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quant_mma: x must be float16 or bfloat16, got {x.dtype}")
    if not all(t.device == x.device for t in (qweight, params, tables)):
        # checked here too: an error raised inside the extension may not cross into Python cleanly
        raise ValueError(f"quant_mma: x is on {x.device} but the weight on {qweight.device}")
    x = x.contiguous()
    if x.data_ptr() % 4:  # the kernel stages activation pairs as 32-bit words
        x = x.clone()
    m = x.shape[0]
    row = 0 if x.dtype == torch.float16 else 1  # the tables row of the activation dtype
    splits, nt = launch_plan(m, n, k, bits, group_size, x.dtype, tables.shape[0], sms, splits)
    kb = qweight.shape[1]
    need = grid_ctas(m, 16 * qweight.shape[0], nt)
    table = tables[row] if row < tables.shape[0] else tables[0, :0]  # no row: IntDecode
    return ext.quant_mma(x, qweight, params, table, _counter_buffer(x.device, need), n, k, bits, group_size, mode,
                         min(splits, kb))
