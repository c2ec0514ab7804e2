"""The column-by-column GPTQ that hf_efficient shipped before the block version (kept only as a test and
benchmark reference): one Python iteration per column, each running encode/decode and an in-block update.
The block version in :mod:`hf_efficient.quantization.gptq` must reproduce its codes up to float rounding.
"""
from __future__ import annotations

import torch

from hf_efficient import formats
from hf_efficient.quantization.gptq import _inverse_hessian_cholesky, _one_cpu_thread
from hf_efficient.quantization.linear import check_finite, group_params
from hf_efficient.quantization.packing import n_groups


@torch.no_grad()
def gptq_quantize_columnwise(weight: torch.Tensor, H: torch.Tensor, fmt, group_size: int, scale_dtype=torch.float16,
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
