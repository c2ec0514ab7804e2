"""Asymmetric clipping init: per group, shrink the max and the min separately to minimise the layer's
output error on calibration inputs, then clamp the float weights to the chosen range (BitDistiller §3.1).

For a group ``g`` of columns with inputs ``X_g`` (tokens, G) the output error of a row ``w`` quantized to
``q`` is ``‖X_g (w - q)ᵀ‖² = (w - q) H_g (w - q)ᵀ`` with ``H_g = X_gᵀ X_g``: one Gram matrix per layer
(as GPTQ accumulates) scores every candidate without re-running the inputs. Candidates are the grid
``hi·a``, ``lo·b`` for ``a, b`` in :meth:`BitDistillerConfig.clip_ratios` (``hi = max(w, 0)``,
``lo = min(w, 0)`` per group, the ranges the formats fit); ``a = b = 1`` (no clipping) is always a candidate,
so the chosen error never exceeds round-to-nearest's.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..quantization.linear import resolve_group_size
from ..quantization.packing import expand_groups, n_groups
from .config import BitDistillerConfig
from .fake_quant import FakeQuantLinear, _skip_patterns, fake_quant_disabled, fake_quantize_weight

logger = logging.getLogger(__name__)


def _group_blocks(H: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks of ``H`` (K, K) as ``(n_groups, G, G)``, zero-padded for a short last group."""
    k = H.shape[0]
    ng = n_groups(k, group_size)
    pad = ng * group_size - k
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad))
    idx = torch.arange(ng, device=H.device)
    return Hp.reshape(ng, group_size, ng, group_size)[idx, :, idx, :]


def group_output_error(w: torch.Tensor, q: torch.Tensor, blocks: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(w - q) H_g (w - q)ᵀ`` for every row and group: ``(N, n_groups)``."""
    n, k = w.shape
    ng = blocks.shape[0]
    d = torch.nn.functional.pad((w - q).float(), (0, ng * group_size - k)).reshape(n, ng, group_size)
    return torch.einsum("ngi,gij,ngj->ng", d, blocks, d)


@torch.no_grad()
def search_clip(w: torch.Tensor, H: torch.Tensor, config: BitDistillerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Best per-group clip range for weight ``w`` (N, K) given the input Gram matrix ``H`` (K, K).

    Returns ``(lo, hi)``, each ``(N, n_groups)`` float32: clamp group ``g`` of row ``n`` to
    ``[lo[n, g], hi[n, g]]``. Raises ValueError when ``H`` does not match ``w``.
    """
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"search_clip: weight {tuple(w.shape)} needs H of shape ({w.shape[1]}, {w.shape[1]}), "
                         f"got {tuple(H.shape)}")
    n, k = w.shape
    gs = resolve_group_size(config.group_size, k)
    ng = n_groups(k, gs)
    wf = w.detach().float()
    blocks = _group_blocks(H.float(), gs)
    pad = ng * gs - k
    # Pad with each row's own last-group first column: leaves that group's max/min unchanged.
    wp = torch.cat([wf, wf[:, (ng - 1) * gs:][:, :1].expand(n, pad)], 1) if pad else wf
    hi0 = wp.reshape(n, ng, gs).amax(-1).clamp(min=0)
    lo0 = wp.reshape(n, ng, gs).amin(-1).clamp(max=0)
    best = torch.full((n, ng), float("inf"), device=w.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    ratios = config.clip_ratios()
    for a in ratios:
        hi = hi0 * a
        hi_cols = expand_groups(hi, k, gs)
        for b in ratios:
            lo = lo0 * b
            wc = torch.minimum(torch.maximum(wf, expand_groups(lo, k, gs)), hi_cols)
            q = fake_quantize_weight(wc, config.weight_format, gs, config.scale_dtype)
            err = group_output_error(wf, q, blocks, gs)
            better = err < best
            best = torch.where(better, err, best)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


@torch.no_grad()
def apply_clip(lin: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, group_size: int | None) -> None:
    """Clamp ``lin.weight`` in place, group by group, to ``[lo, hi]`` (each ``(N, n_groups)``)."""
    k = lin.in_features
    gs = resolve_group_size(group_size, k)
    w = lin.weight
    w.copy_(torch.minimum(torch.maximum(w.float(), expand_groups(lo, k, gs)), expand_groups(hi, k, gs)).to(w.dtype))


@torch.no_grad()
def init_clipping(model: nn.Module, config: BitDistillerConfig, windows: torch.Tensor,
                  progress: bool = True) -> dict[str, float]:
    """Clip the weights of every linear that BitDistiller quantizes, decoder layer by decoder layer.

    ``windows``: ``(n, seqlen)`` token ids. Each layer's linears see the outputs of the already clipped
    (float, not quantized) layers before it. Returns ``{layer name: relative output-error reduction}``
    (``1 - err_clipped / err_rtn`` summed over groups) for logging and tests.
    """
    from tqdm.auto import tqdm

    from ..quantization.api import _capture_first_layer_inputs, _layer_output, decoder_layers
    from ..quantization.config import matches_module
    from ..quantization.gptq import HessianAccumulator

    if windows.dim() != 2:
        raise ValueError(f"init_clipping: windows must be (n, seqlen) token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    skip = _skip_patterns(model, config)
    was_training = model.training
    model.eval()
    gains: dict[str, float] = {}
    with fake_quant_disabled(model):
        layers = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        hidden, kwargs = _capture_first_layer_inputs(model, layers, windows, device)
        for i, layer in enumerate(tqdm(layers, desc="clipping init", disable=not progress)):
            lins = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules()
                    if isinstance(m, nn.Linear) and (type(m) is nn.Linear or isinstance(m, FakeQuantLinear))
                    and not matches_module(f"{prefix}.{i}.{n}", skip) and ".lora_" not in f".{n}"}
            acc = {n: HessianAccumulator(m.in_features, device) for n, m in lins.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, args, _n=n: acc[_n].add(args[0]))
                     for n, m in lins.items()]
            try:
                for h, kw in zip(hidden, kwargs):
                    layer(h, **kw)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in lins.items():
                H = acc[n].H
                lo, hi = search_clip(m.weight, H, config)
                gs = resolve_group_size(config.group_size, m.in_features)
                blocks = _group_blocks(H, gs)
                w0 = m.weight.detach().float()
                rtn = group_output_error(w0, fake_quantize_weight(w0, config.weight_format, gs,
                                                                  config.scale_dtype), blocks, gs).sum()
                apply_clip(m, lo, hi, config.group_size)
                clipped = group_output_error(w0, fake_quantize_weight(m.weight.detach().float(),
                                                                      config.weight_format, gs,
                                                                      config.scale_dtype), blocks, gs).sum()
                gains[n] = float(1 - clipped / rtn) if rtn > 0 else 0.0
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    model.train(was_training)
    if gains:
        logger.info("clipping init: mean output-error reduction %.1f %% over %d linears",
                    100 * sum(gains.values()) / len(gains), len(gains))
    return gains
