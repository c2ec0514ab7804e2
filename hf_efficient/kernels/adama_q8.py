"""AdamA's fold and update for 8-bit block-wise states (``hf_efficient.optim.lowbit.Q8State``) in Triton:
one launch per bucket of tensors, dequantize -> fold/update in fp32 -> re-quantize in registers.

Format (see :mod:`hf_efficient.optim.lowbit`): per block of BS consecutive elements an fp32 absmax
``scale`` and uint8 codes indexing a sorted 256-entry value grid (``grid``, fp32, in units of the
absmax). Quantization picks, like ``lowbit.quantize_blockwise``, the two grid neighbours of
y = x / absmax (the first grid value >= y and the one below; the grid is geometric, so a log2 gives
the index and one comparison on each side corrects it) and rounds to the nearer one (ties up), or
up with probability equal to the position between them when ``seed`` is given.

Tensor tables, int64: fold (k, 7): grad, m codes, m scale, v codes, v scale addresses, numel, first;
update (k, 6): param, m codes, m scale, v codes, v scale addresses, numel, plus float64 (k, 3)
step size, sqrt(1 - b2**t), decay. Programs own ROWS blocks of one tensor (program table cached
per tuple of sizes). Reference: the per-tensor plain-torch path in ``hf_efficient.optim.adama``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adama_fold import _DTYPE_CODE, _ptr, fold_moments

ROWS = 8
_PROGRAMS: dict[tuple, torch.Tensor] = {}


@triton.jit
def _dequant(codes_ptr, scale_ptr, grid_ptr, blk, offs, mask):
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    s = tl.load(scale_ptr + blk)
    return tl.load(grid_ptr + c, mask=mask, other=0.0) * s[:, None]


@triton.jit
def _quantize_store(x, codes_ptr, scale_ptr, grid_ptr, blk, offs, mask, seed, rnd_offs,
                    SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    x = tl.where(mask, x, 0.0)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)
    y = x / scale[:, None]
    a = tl.maximum(tl.abs(y), 1e-38)
    if SIGNED:
        # grid[i] = -2**(-i/16) for i < 127, grid[127] = 0, grid[254 - k] = 2**(-k/16)
        pos = tl.ceil(254.0 + 16.0 * tl.log2(a))
        neg = tl.ceil(-16.0 * tl.log2(a))
        hi = tl.where(y > 0, tl.maximum(pos, 128.0), tl.where(y < 0, tl.minimum(neg, 127.0), 127.0)).to(tl.int32)
        top = 254
    else:
        # grid[0] = 0, grid[i] = 2**(-(255 - i)/14)
        hi = tl.ceil(255.0 + 14.0 * tl.log2(a)).to(tl.int32)
        top = 255
    hi = tl.minimum(tl.maximum(hi, 1), top)
    # the log2 estimate can be one off at grid points: move to the first grid value >= y
    hi = tl.where(tl.load(grid_ptr + hi - 1) >= y, hi - 1, hi)
    hi = tl.maximum(hi, 1)
    hi = tl.where((tl.load(grid_ptr + hi) < y) & (hi < top), hi + 1, hi)
    g_lo = tl.load(grid_ptr + hi - 1)
    g_hi = tl.load(grid_ptr + hi)
    frac = tl.minimum(tl.maximum((y - g_lo) / (g_hi - g_lo), 0.0), 1.0)
    if STOCHASTIC:
        up = tl.rand(seed, rnd_offs) < frac
    else:
        up = frac >= 0.5
    code = tl.where(up, hi, hi - 1)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + blk, scale, mask=blk >= 0)


@triton.jit
def _load_states(row, row0, mgrid_ptr, vgrid_ptr, BS: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS blocks of one tensor: its state pointers (table row entries 1-5), block indices
    (-1 past the end), element offsets and mask, and the dequantized ``m`` and ``v``."""
    mc_ptr = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
    ms_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    vc_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    vs_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 5)
    n_blocks = (n + BS - 1) // BS
    blk = row0 + tl.arange(0, ROWS)
    blk = tl.where(blk < n_blocks, blk, -1)
    offs = blk[:, None].to(tl.int64) * BS + tl.arange(0, BS)[None, :]
    mask = (blk[:, None] >= 0) & (offs < n)
    safe_blk = tl.maximum(blk, 0)
    m = _dequant(mc_ptr, ms_ptr, mgrid_ptr, safe_blk, offs, mask)
    v = _dequant(vc_ptr, vs_ptr, vgrid_ptr, safe_blk, offs, mask)
    return mc_ptr, ms_ptr, vc_ptr, vs_ptr, blk, offs, mask, m, v


@triton.jit
def _fold_q8_kernel(tab_ptr, prog_ptr, gscale_ptr, mgrid_ptr, vgrid_ptr, b1, b2, c_m, c_v, seed,
                    G: tl.constexpr, STOCHASTIC: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)
    row0 = tl.load(prog_ptr + 2 * pid + 1)
    row = tab_ptr + 7 * t
    g_ptr = _ptr(tl.load(row), G)
    first = tl.load(row + 6)
    s = tl.load(gscale_ptr + t)
    mc_ptr, ms_ptr, vc_ptr, vs_ptr, blk, offs, mask, m, v = _load_states(row, row0, mgrid_ptr, vgrid_ptr, BS, ROWS)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s
    m, v = fold_moments(m, v, g, first, b1, b2, c_m, c_v)
    rnd = (pid.to(tl.int64) * (2 * ROWS * BS) + tl.arange(0, ROWS)[:, None] * BS + tl.arange(0, BS)[None, :])
    _quantize_store(m, mc_ptr, ms_ptr, mgrid_ptr, blk, offs, mask, seed, rnd, True, STOCHASTIC)
    _quantize_store(v, vc_ptr, vs_ptr, vgrid_ptr, blk, offs, mask, seed, rnd + ROWS * BS, False, STOCHASTIC)


@triton.jit
def _update_q8_kernel(tab_ptr, hp_ptr, prog_ptr, mgrid_ptr, vgrid_ptr, eps, bound,
                      P: tl.constexpr, BOUNDED: tl.constexpr, BS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)
    row0 = tl.load(prog_ptr + 2 * pid + 1)
    row = tab_ptr + 6 * t
    p_ptr = _ptr(tl.load(row), P)
    step_size = tl.load(hp_ptr + 3 * t).to(tl.float32)
    sqrt_c2 = tl.load(hp_ptr + 3 * t + 1).to(tl.float32)
    decay = tl.load(hp_ptr + 3 * t + 2).to(tl.float32)
    _, _, _, _, _, offs, mask, m, v = _load_states(row, row0, mgrid_ptr, vgrid_ptr, BS, ROWS)
    if BOUNDED:  # |m| <= bound sqrt(v) holds for exact states; a v rounded to 0 must not blow up the step
        lim = tl.sqrt(v) * bound
        m = tl.minimum(tl.maximum(m, -lim), lim)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    denom = tl.sqrt(v) / sqrt_c2 + eps
    p = p * decay - step_size * (m / denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _programs(numels: tuple[int, ...], bs: int, device) -> torch.Tensor:
    key = (numels, bs, str(device))
    tab = _PROGRAMS.get(key)
    if tab is None:
        rows = [triton.cdiv(triton.cdiv(n, bs), ROWS) for n in numels]
        counts = torch.tensor(rows, dtype=torch.int64)
        idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_prog = torch.cumsum(counts, 0) - counts
        start = (torch.arange(idx.numel()) - first_prog[idx]) * ROWS
        tab = torch.stack([idx, start], 1).contiguous().to(device)
        if len(_PROGRAMS) > 256:
            _PROGRAMS.clear()
        _PROGRAMS[key] = tab
    return tab


def _check_states(states, block_size, device):
    for st in states:
        if st.block_size != block_size or st.codes.device != device or not st.codes.is_contiguous():
            raise ValueError(f"adama_q8: states must share block_size {block_size} and live contiguous on {device}")
    if block_size & (block_size - 1):
        raise ValueError(f"adama_q8: block_size must be a power of two, got {block_size}")


def fold_q8_triton(grads, exp_avgs, exp_avg_sqs, firsts, gscale, *, beta1, beta2, n, mgrid, vgrid, seed=None):
    """One launch: fold ``grads`` into the Q8 states ``exp_avgs`` (signed) / ``exp_avg_sqs`` (unsigned).

    grads: contiguous tensors of one dtype (fp32/bf16/fp16); states: Q8State with one block size;
    mgrid/vgrid: the signed/unsigned value grids (fp32 (256,) on the device); gscale: fp32 (k,) or None.
    """
    k = len(grads)
    if k == 0:
        return
    dev = grads[0].device
    bs = exp_avgs[0].block_size
    _check_states(list(exp_avgs) + list(exp_avg_sqs), bs, dev)
    if len({g.dtype for g in grads}) != 1 or not all(g.is_contiguous() for g in grads):
        raise ValueError("adama_q8: one launch takes contiguous gradients of one dtype")
    tab = torch.tensor([[g.data_ptr(), m.codes.data_ptr(), m.scale.data_ptr(), v.codes.data_ptr(), v.scale.data_ptr(),
                         g.numel(), int(bool(f))] for g, m, v, f in zip(grads, exp_avgs, exp_avg_sqs, firsts)],
                       dtype=torch.int64).to(dev, non_blocking=True)
    if gscale is None:
        gscale = torch.ones(k, dtype=torch.float32, device=dev)
    progs = _programs(tuple(g.numel() for g in grads), bs, dev)
    _fold_q8_kernel[(progs.shape[0],)](tab, progs, gscale, mgrid, vgrid, float(beta1), float(beta2), 1.0 - beta1,
                                       (1.0 - beta2) * n, int(seed or 0) & 0x7FFFFFFF, G=_DTYPE_CODE[grads[0].dtype],
                                       STOCHASTIC=seed is not None, BS=bs, ROWS=ROWS)


def update_q8_triton(params, exp_avgs, exp_avg_sqs, *, step_sizes, sqrt_c2s, decays, eps, bound, mgrid, vgrid):
    """One launch: the AdamA update from Q8 states (``bound``: clamp |m| <= bound sqrt(v), or None)."""
    k = len(params)
    if k == 0:
        return
    dev = params[0].device
    bs = exp_avgs[0].block_size
    _check_states(list(exp_avgs) + list(exp_avg_sqs), bs, dev)
    if len({p.dtype for p in params}) != 1 or not all(p.is_contiguous() for p in params):
        raise ValueError("adama_q8: one launch takes contiguous parameters of one dtype")
    tab = torch.tensor([[p.data_ptr(), m.codes.data_ptr(), m.scale.data_ptr(), v.codes.data_ptr(), v.scale.data_ptr(),
                         p.numel()] for p, m, v in zip(params, exp_avgs, exp_avg_sqs)],
                       dtype=torch.int64).to(dev, non_blocking=True)
    hp = torch.tensor(list(zip(step_sizes, sqrt_c2s, decays)), dtype=torch.float64).to(dev, non_blocking=True)
    progs = _programs(tuple(p.numel() for p in params), bs, dev)
    _update_q8_kernel[(progs.shape[0],)](tab, hp, progs, mgrid, vgrid, float(eps), float(bound or 0.0),
                                         P=_DTYPE_CODE[params[0].dtype], BOUNDED=bound is not None, BS=bs, ROWS=ROWS)
