"""Plain-torch reference of AdamA's fold and update, one tensor at a time (the test oracle).

Both the Triton kernels (:mod:`.adama_fold`) and the vectorised torch path (:mod:`.adama_foreach`)
compute exactly these formulas over a list of tensors; states are fp32 or bf16, and bf16 states are
rounded stochastically when a generator is given (nearest otherwise).
"""
from __future__ import annotations

import math

import torch


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 ``x`` -> bf16; stochastic rounding (unbiased between the two bf16 neighbours) with ``generator``.

    Adding 16 random bits below bf16's last mantissa bit and truncating rounds up with probability
    equal to the discarded fraction; a carry into the exponent is the correct next value.
    """
    if generator is None:
        return x.to(torch.bfloat16)
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def fold_reference(grads, exp_avgs, exp_avg_sqs, firsts, gscales, *, beta1: float, beta2: float, n: int,
                   generator: torch.Generator | None = None) -> None:
    """Fold gradient contributions into m and v in place.

    ``m <- (b1 if first else 1) * m + (1 - b1) * s * g``, ``v <- (b2 if first else 1) * v + (1 - b2) * n * (s * g)**2``
    with s = ``gscales[i]`` (a float or 0-dim tensor: per-tensor clip factor). fp32 arithmetic.
    """
    for g, m, v, first, s in zip(grads, exp_avgs, exp_avg_sqs, firsts, gscales):
        g32 = g.float() * s
        m32 = m.float() * (beta1 if first else 1.0) + (1.0 - beta1) * g32
        v32 = v.float() * (beta2 if first else 1.0) + (1.0 - beta2) * n * g32 * g32
        for dst, val in ((m, m32), (v, v32)):
            dst.copy_(val if dst.dtype == torch.float32 else round_to_bf16(val, generator))


def update_reference(params, exp_avgs, exp_avg_sqs, *, step_sizes, sqrt_c2s, decays, eps: float) -> None:
    """``p <- p * decay - step_size * m / (sqrt(v) / sqrt_c2 + eps)`` in fp32, stored in p's dtype.

    step_size = lr / (1 - b1**t), sqrt_c2 = sqrt(1 - b2**t), decay = 1 - lr * weight_decay (per tensor).
    """
    for p, m, v, a, c, d in zip(params, exp_avgs, exp_avg_sqs, step_sizes, sqrt_c2s, decays):
        denom = v.float().sqrt() / c + eps
        p.copy_(p.float() * d - a * m.float() / denom)


def bias_corrections(lr: float, beta1: float, beta2: float, t: int, weight_decay: float) -> tuple[float, float, float]:
    """(step_size, sqrt_c2, decay) of :func:`update_reference` for step ``t``."""
    return lr / (1.0 - beta1 ** t), math.sqrt(1.0 - beta2 ** t), 1.0 - lr * weight_decay
