"""AdamA's fold and update over a list of tensors with ``torch._foreach_*`` ops (CPU, and any device
without Triton): a handful of multi-tensor ops per bucket instead of four ops per tensor.

Same formulas as :mod:`.adama_reference`. fp32 states are updated in place by foreach ops; bf16
states (and bf16/fp16 parameters) go through fp32 temporaries, one tensor at a time, because no
foreach op changes dtype.
"""
from __future__ import annotations

import torch

from .adama_reference import round_to_bf16


def _scaled(grads, gscales):
    """Gradients as fp32 (a copy only when needed), multiplied by per-tensor factors when given."""
    g32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if gscales is None:
        return g32
    return [g * s for g, s in zip(g32, gscales)]


def fold_foreach(grads, exp_avgs, exp_avg_sqs, firsts, gscales, *, beta1: float, beta2: float, n: int,
                 generator: torch.Generator | None = None) -> None:
    """:func:`.adama_reference.fold_reference` with foreach ops. ``gscales``: None (all 1) or a list."""
    g32 = _scaled(grads, gscales)
    fp32 = [i for i, m in enumerate(exp_avgs) if m.dtype == torch.float32]
    low = [i for i, m in enumerate(exp_avgs) if m.dtype != torch.float32]
    if fp32:
        ms, vs, gs = [exp_avgs[i] for i in fp32], [exp_avg_sqs[i] for i in fp32], [g32[i] for i in fp32]
        first = [i for i, j in enumerate(fp32) if firsts[j]]
        if first:
            torch._foreach_mul_([ms[i] for i in first], beta1)
            torch._foreach_mul_([vs[i] for i in first], beta2)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_addcmul_(vs, gs, gs, value=(1.0 - beta2) * n)
    for i in low:
        m, v, g = exp_avgs[i], exp_avg_sqs[i], g32[i]
        m32, v32 = m.float(), v.float()
        if firsts[i]:
            m32.mul_(beta1)
            v32.mul_(beta2)
        m32.add_(g, alpha=1.0 - beta1)
        v32.addcmul_(g, g, value=(1.0 - beta2) * n)
        m.copy_(round_to_bf16(m32, generator))
        v.copy_(round_to_bf16(v32, generator))


def update_foreach(params, exp_avgs, exp_avg_sqs, *, step_sizes, sqrt_c2s, decays, eps: float) -> None:
    """:func:`.adama_reference.update_reference` with foreach ops (per-tensor scalars as lists)."""
    fast = [i for i, (p, m) in enumerate(zip(params, exp_avgs))
            if p.dtype == torch.float32 and m.dtype == torch.float32]
    slow = [i for i in range(len(params)) if i not in set(fast)]
    if fast:
        ps, ms = [params[i] for i in fast], [exp_avgs[i] for i in fast]
        denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in fast])
        torch._foreach_div_(denom, [sqrt_c2s[i] for i in fast])
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(ps, [decays[i] for i in fast])
        torch._foreach_addcdiv_(ps, ms, denom, [-step_sizes[i] for i in fast])
    for i in slow:
        p = params[i]
        denom = exp_avg_sqs[i].float().sqrt().div_(sqrt_c2s[i]).add_(eps)
        p.copy_(p.float().mul_(decays[i]).addcdiv_(exp_avgs[i].float(), denom, value=-step_sizes[i]))
