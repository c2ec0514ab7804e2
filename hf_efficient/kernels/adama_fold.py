"""AdamA's fold and update as one Triton launch per bucket of tensors (multi-tensor kernels).

A launch covers any number of tensors of one dtype combination. Each program owns BLOCK elements of
one tensor; a per-launch table holds each tensor's addresses, so the gradients (new tensors every
micro-batch) need no copy into a flat buffer. Tables are small int64 tensors: the tensor table
(addresses, sizes, flags; rebuilt per launch, one host-to-device copy) and the program table
(tensor index and first element of each program; cached per tuple of sizes).

Layouts:
* fold tensor table, int64 (k, 5): grad address, m address, v address, numel, first (1: decay m, v
  by beta1, beta2 before adding). ``gscale``: fp32 (k,) device tensor of per-tensor gradient factors
  (clipping without a host sync).
* update tensor table, int64 (k, 4): param, m, v addresses, numel; float64 (k, 3): step size
  lr / (1 - b1**t), sqrt(1 - b2**t), decay 1 - lr * wd.
* bf16 states are stored with stochastic rounding when ``seed`` is given (16 random bits added below
  bf16's last mantissa bit, then truncated), nearest otherwise.

Every function matches :mod:`.adama_reference` (tests run it under ``TRITON_INTERPRET=1`` on CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _ptr(addr, CODE: tl.constexpr):
    if CODE == 1:
        return addr.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 2:
        return addr.to(tl.pointer_type(tl.float16))
    else:
        return addr.to(tl.pointer_type(tl.float32))


@triton.jit
def _store_state(ptr, x, offs, mask, seed, rnd_offs, CODE: tl.constexpr, STOCHASTIC: tl.constexpr):
    if CODE == 1:
        # Round in integer arithmetic, so the interpreter (which truncates) and the GPU agree bit for bit;
        # the low 16 bits are then zero and the cast to bf16 is exact.
        bits = x.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            bits = bits + (tl.randint(seed, rnd_offs) & 0xFFFF)
        else:
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # to nearest, ties to even
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(ptr + offs, x.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def fold_moments(m, v, g, first, b1, b2, c_m, c_v):
    """AdamA's fold of one micro-batch gradient ``g`` into the moments; the decay applies once per step, at the
    step's first micro-batch (``first != 0``). Shared with the 8-bit kernels (adama_q8)."""
    dm = tl.where(first != 0, b1, 1.0)
    dv = tl.where(first != 0, b2, 1.0)
    return m * dm + c_m * g, v * dv + c_v * g * g


@triton.jit
def _fold_kernel(tab_ptr, prog_ptr, gscale_ptr, b1, b2, c_m, c_v, seed,
                 G: tl.constexpr, S: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)
    start = tl.load(prog_ptr + 2 * pid + 1)
    row = tab_ptr + 5 * t
    g_ptr = _ptr(tl.load(row), G)
    m_ptr = _ptr(tl.load(row + 1), S)
    v_ptr = _ptr(tl.load(row + 2), S)
    n = tl.load(row + 3)
    first = tl.load(row + 4)
    s = tl.load(gscale_ptr + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = fold_moments(m, v, g, first, b1, b2, c_m, c_v)
    rnd = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, BLOCK)
    _store_state(m_ptr, m, offs, mask, seed, rnd, S, STOCHASTIC)
    _store_state(v_ptr, v, offs, mask, seed, rnd + BLOCK, S, STOCHASTIC)


@triton.jit
def _update_kernel(tab_ptr, hp_ptr, prog_ptr, eps, P: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + 2 * pid)
    start = tl.load(prog_ptr + 2 * pid + 1)
    row = tab_ptr + 4 * t
    p_ptr = _ptr(tl.load(row), P)
    m_ptr = _ptr(tl.load(row + 1), S)
    v_ptr = _ptr(tl.load(row + 2), S)
    n = tl.load(row + 3)
    step_size = tl.load(hp_ptr + 3 * t).to(tl.float32)
    sqrt_c2 = tl.load(hp_ptr + 3 * t + 1).to(tl.float32)
    decay = tl.load(hp_ptr + 3 * t + 2).to(tl.float32)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    denom = tl.sqrt(v) / sqrt_c2 + eps
    p = p * decay - step_size * (m / denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


_PROGRAMS: dict[tuple, torch.Tensor] = {}


def _programs(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 (P, 2) device table: tensor index and first element of each program (cached)."""
    key = (numels, str(device))
    tab = _PROGRAMS.get(key)
    if tab is None:
        counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
        idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_prog = torch.cumsum(counts, 0) - counts
        start = (torch.arange(idx.numel()) - first_prog[idx]) * BLOCK
        tab = torch.stack([idx, start], 1).contiguous().to(device)
        if len(_PROGRAMS) > 256:  # bucket compositions are few; bound the cache anyway
            _PROGRAMS.clear()
        _PROGRAMS[key] = tab
    return tab


def _check(name, tensors, codes, device):
    for x in tensors:
        if x.device != device or not x.is_contiguous() or x.dtype not in codes:
            raise ValueError(f"adama_fold: {name} tensors must be contiguous {sorted(map(str, codes))} on {device}; "
                             f"got {x.dtype}, contiguous={x.is_contiguous()}, device {x.device}")


def fold_triton(grads, exp_avgs, exp_avg_sqs, firsts, gscale: torch.Tensor | None, *, beta1: float, beta2: float,
                n: int, seed: int | None = None) -> None:
    """One launch: :func:`.adama_reference.fold_reference` over all tensors.

    grads: contiguous fp32/bf16/fp16 tensors of one dtype; exp_avgs/exp_avg_sqs: contiguous fp32 or
    bf16 tensors of one dtype, shapes matching the grads; firsts: bools; gscale: fp32 (k,) on the
    device or None (all 1); seed: stochastic rounding of bf16 states (None: nearest).
    """
    k = len(grads)
    if k == 0:
        return
    dev = grads[0].device
    if len({g.dtype for g in grads}) != 1 or len({m.dtype for m in exp_avgs}) != 1:
        raise ValueError("adama_fold: one launch takes one gradient dtype and one state dtype")
    _check("gradient", grads, _DTYPE_CODE, dev)
    _check("state", list(exp_avgs) + list(exp_avg_sqs), (torch.float32, torch.bfloat16), dev)
    for g, m in zip(grads, exp_avgs):
        if g.numel() != m.numel():
            raise ValueError(f"adama_fold: gradient of {g.numel()} elements vs state of {m.numel()}")
    numels = tuple(g.numel() for g in grads)
    tab = torch.tensor([[g.data_ptr(), m.data_ptr(), v.data_ptr(), g.numel(), int(bool(f))]
                        for g, m, v, f in zip(grads, exp_avgs, exp_avg_sqs, firsts)], dtype=torch.int64)
    tab = tab.to(dev, non_blocking=True)
    if gscale is None:
        gscale = torch.ones(k, dtype=torch.float32, device=dev)
    progs = _programs(numels, dev)
    stochastic = seed is not None and exp_avgs[0].dtype == torch.bfloat16
    _fold_kernel[(progs.shape[0],)](tab, progs, gscale, float(beta1), float(beta2), 1.0 - beta1,
                                    (1.0 - beta2) * n, int(seed or 0) & 0x7FFFFFFF, G=_DTYPE_CODE[grads[0].dtype],
                                    S=_DTYPE_CODE[exp_avgs[0].dtype], STOCHASTIC=stochastic, BLOCK=BLOCK)


def update_triton(params, exp_avgs, exp_avg_sqs, *, step_sizes, sqrt_c2s, decays, eps: float) -> None:
    """One launch: :func:`.adama_reference.update_reference` over all tensors (one param and one state dtype)."""
    k = len(params)
    if k == 0:
        return
    dev = params[0].device
    if len({p.dtype for p in params}) != 1 or len({m.dtype for m in exp_avgs}) != 1:
        raise ValueError("adama_fold: one launch takes one parameter dtype and one state dtype")
    _check("parameter", params, _DTYPE_CODE, dev)
    _check("state", list(exp_avgs) + list(exp_avg_sqs), (torch.float32, torch.bfloat16), dev)
    tab = torch.tensor([[p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel()]
                        for p, m, v in zip(params, exp_avgs, exp_avg_sqs)], dtype=torch.int64)
    tab = tab.to(dev, non_blocking=True)
    hp = torch.tensor(list(zip(step_sizes, sqrt_c2s, decays)), dtype=torch.float64).to(dev, non_blocking=True)
    progs = _programs(tuple(p.numel() for p in params), dev)
    _update_kernel[(progs.shape[0],)](tab, hp, progs, float(eps), P=_DTYPE_CODE[params[0].dtype],
                                      S=_DTYPE_CODE[exp_avgs[0].dtype], BLOCK=BLOCK)
