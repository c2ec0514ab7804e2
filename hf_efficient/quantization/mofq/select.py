"""MoFQ's per-layer format choice: weight MSE (on load) or layer-output error on calibration inputs."""
from __future__ import annotations

import torch

from ... import formats
from ..linear import expand_groups, resolve_group_size, rtn_quantize


def rtn_dequant(w: torch.Tensor, fmt: str, group_size: int | None, scale_dtype, name=None) -> torch.Tensor:
    f = formats.get_format(fmt)
    g = resolve_group_size(group_size, w.shape[1])
    codes, params = rtn_quantize(w, f, g, scale_dtype, name)
    return formats.decode(f, codes, {k: expand_groups(v, w.shape[1], g) for k, v in params.items()})


def weight_errors(w: torch.Tensor, candidates, group_size, scale_dtype, name=None) -> dict[str, float]:
    """Mean squared weight error of round-to-nearest in each candidate format."""
    w = w.detach().float()
    return {c: (rtn_dequant(w, c, group_size, scale_dtype, name) - w).pow(2).mean().item() for c in candidates}


def output_errors(w: torch.Tensor, x: torch.Tensor, candidates, group_size, scale_dtype, act_format,
                  name=None, relative: bool = False) -> dict[str, float]:
    """Mean squared output error of ``x @ W^T`` when ``W`` (RTN) and, under W8A8, ``x`` (per token) are quantized.

    ``x``: calibration inputs of the layer, (tokens, in_features). ``act_format(weight_fmt)`` gives the
    activation format paired with a weight format (None: activations stay float; then the error is
    ``x @ (W_q - W)^T``, one matmul for all weight-only candidates together). ``relative``: each token's
    squared error is divided by its squared float output ``||x_t W^T||^2`` before the mean, so every token
    weighs the same: attention-sink tokens, whose outputs can be 1e5x larger than the rest, no longer decide
    the choice alone.
    """
    w = w.detach().float()
    x = x.float()
    # the float output, needed only by activation-quantized candidates and the relative weighting
    y = x @ w.T if relative or any(act_format(c) is not None for c in candidates) else None
    # per token: 1 (plain mean over outputs) or 1 / ||y_t||^2 (relative); tokens with a zero output are skipped
    if relative:
        norm = y.pow(2).sum(1)
        weight = torch.where(norm > 0, 1.0 / norm, 0.0)
    else:
        weight = torch.full((x.shape[0],), 1.0 / w.shape[0], device=x.device)
    out, weight_only = {}, []
    for c in candidates:
        a = act_format(c)
        if a is None:
            weight_only.append(c)
            continue
        xq = formats.quantize_per_token(formats.get_format(a), x)
        err = (xq @ rtn_dequant(w, c, group_size, scale_dtype, name).T - y).pow(2).sum(1)
        out[c] = (err * weight).mean().item()
    if weight_only:
        delta = torch.cat([rtn_dequant(w, c, group_size, scale_dtype, name) - w for c in weight_only])
        err = (x @ delta.T).pow(2).reshape(x.shape[0], len(weight_only), w.shape[0]).sum(2)
        out.update(zip(weight_only, (err * weight[:, None]).mean(0).tolist()))
    return {c: out[c] for c in candidates}


def best(errors: dict[str, float]) -> str:
    """The candidate with the smallest error (the first listed wins ties)."""
    return min(errors, key=lambda c: (errors[c], list(errors).index(c)))
