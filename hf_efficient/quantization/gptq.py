"""GPTQ-style calibrated quantization of one weight matrix, for every format of :mod:`hf_efficient.formats`.

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet
quantized through the inverse Hessian ``H = 2 X Xᵀ / n`` of the layer inputs (Frantar et al., 2022), in
blocks with lazy updates. The format only enters through ``formats.fit_params`` / ``encode`` / ``decode``,
so symmetric, zero-point and AFPQ two-scale formats all work: AFPQ's (s_pos, s_neg) replace GPTQ's
(scale, zero). Group parameters are fitted when the first column of a group is reached, on the
error-updated weights (as GPTQ does); with ``act_order`` columns go by decreasing Hessian diagonal and
group parameters are fitted up front on the original weights ("static groups"), so the stored layout
stays in the original column order with contiguous groups.
"""
from __future__ import annotations

import contextlib

import torch

from .. import formats
from .linear import check_finite, group_params
from .packing import n_groups


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over the rows of the inputs a linear layer sees."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, raising λ if H is not positive definite."""
    mean_diag = torch.mean(torch.diag(H)).clamp(min=1e-8)
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for factor in (1, 10, 100, 1000):
        L, info = torch.linalg.cholesky_ex(H + eye * (damp * factor + (0 if damp else 1e-6)) * mean_diag)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise ValueError("the calibration Hessian is not positive definite even with 1000x dampening; "
                     "use more calibration samples")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The per-column ops touch one column (~10³ values): splitting them over OpenMP threads costs more
    than it saves (a 1536-value searchsorted took 6 ms on 2 busy threads vs 0.14 ms on one)."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, fmt, group_size: int, scale_dtype=torch.float16,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  name: str | None = None) -> tuple[torch.Tensor, dict]:
    """Quantize ``weight`` (N, K) given the input Hessian ``H`` (K, K).

    Returns ``(codes uint8 (N, K), {param: (N, n_groups) float32})`` in the original column order, ready
    for :meth:`QuantLinear.load_quantized`.
    """
    fmt = formats.get_format(fmt)
    check_finite(weight, name)
    W = weight.detach().float().clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"layer {name}: Hessian shape {tuple(H.shape)} does not match in_features {K}")
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0  # inputs that are always zero: any value works, zero is exact

    ng = n_groups(K, group_size)
    params = {p: torch.zeros(N, ng, device=W.device) for p in fmt.param_names}
    if act_order:
        static = group_params(fmt, W, group_size, scale_dtype)
        for p in params:
            params[p].copy_(static[p])
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_hessian_cholesky(H, damp)
    group_of = (perm // group_size).tolist()
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _one_cpu_thread(W.device):
            for i in range(i2 - i1):
                col = i1 + i
                g = group_of[col]
                if not act_order and perm[col] % group_size == 0:
                    # Fit this group on the weights as updated by the error feedback so far.
                    start, stop = col, min(col + group_size, K)
                    cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : stop - start]
                    fitted = formats.fit_params(fmt, cur, scale_dtype)
                    for p in params:
                        params[p][:, g] = fitted[p]
                w = W1[:, i]
                p_col = {p: t[:, g] for p, t in params.items()}
                c = formats.encode(fmt, w, p_col)
                q = formats.decode(fmt, c, p_col)
                codes[:, col] = c
                err = (w - q) / U1[i, i]
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, params
