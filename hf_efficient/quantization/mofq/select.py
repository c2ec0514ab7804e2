"""MoFQ's per-layer format choice: weight MSE (weight-only) or layer-output error (W8A8)."""
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
                  name=None) -> dict[str, float]:
    """Mean squared output error of ``x @ W^T`` when both ``W`` (RTN) and ``x`` (per token) are quantized.

    ``x``: calibration inputs of the layer, (tokens, in_features). ``act_format(weight_fmt)`` gives the
    activation format paired with a weight format (None: activations stay float).
    """
    w = w.detach().float()
    x = x.float()
    ref = x @ w.T
    out = {}
    for c in candidates:
        a = act_format(c)
        xq = formats.quantize_per_token(formats.get_format(a), x) if a else x
        out[c] = (xq @ rtn_dequant(w, c, group_size, scale_dtype, name).T - ref).pow(2).mean().item()
    return out


def best(errors: dict[str, float]) -> str:
    """The candidate with the smallest error (the first listed wins ties)."""
    return min(errors, key=lambda c: (errors[c], list(errors).index(c)))
