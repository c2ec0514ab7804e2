"""The LUT kernels as the CPU fast path of :class:`~hf_efficient.quantization.QuantLinear`.

A layer runs on the LUT kernels once :func:`enable_lut` has permuted its weights into the kernel layout
(``LUTConfig`` models do this when loaded; any QuantLinear model, e.g. AFPQ, can opt in). The permuted weights
live beside the stored ones (``layer._lut``, never saved) and are rebuilt if the stored tensors change.
The fast path declines (the plain-torch path runs) for non-CPU inputs, inputs needing gradients, group sizes
the kernels cannot tile, and prefill-sized inputs above :data:`MAX_LUT_ROWS` rows, where a dequantized
BLAS GEMM is faster than one LUT pass per row.
"""
from __future__ import annotations

import torch
from torch import nn

from ..linear import QuantLinear, register_fast_path
from . import kernel

MAX_LUT_ROWS = 32


def _key(layer: QuantLinear) -> tuple:
    ts = [layer.qweight] + [getattr(layer, p) for p in layer.fmt.param_names]
    return tuple((id(t), t._version) for t in ts)


def supported(layer: QuantLinear) -> bool:
    return (1 <= layer.fmt.bits <= 4 and layer.act_fmt is None
            and kernel.kernel_group_size(layer.group_size, layer.in_features) is not None)


def prepare_layer(layer: QuantLinear) -> kernel.LUTWeight | None:
    """Build (or reuse) the layer's kernel-layout weights; None if the kernels cannot run this layer."""
    if not supported(layer) or layer.qweight.device.type != "cpu":
        return None
    key = _key(layer)
    cached = getattr(layer, "_lut", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = kernel.prepare(layer.codes(), layer.fmt, layer.params(), layer.group_size)
    layer._lut = (key, w)
    return w


def enable_lut(model: nn.Module, enabled: bool = True) -> list[str]:
    """Run every supported QuantLinear of ``model`` on the CPU LUT kernels (permuting weights now).

    Returns the names of the layers that will use the kernels. ``enabled=False`` switches back to the
    default paths and frees the permuted copies.
    """
    if enabled and not kernel.available():
        raise RuntimeError("enable_lut: the hf_efficient C++ extension is not built")
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        m._lut_enabled = enabled
        if not enabled:
            m.__dict__.pop("_lut", None)
        elif prepare_layer(m) is not None:
            names.append(name)
    return names


def lut_fast_path(x: torch.Tensor, layer: QuantLinear):
    if not getattr(layer, "_lut_enabled", False) or x.device.type != "cpu":
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None
    if x.numel() // max(x.shape[-1], 1) > MAX_LUT_ROWS:
        return None
    if torch.compiler.is_compiling():
        # Under torch.compile the staleness key (ids and tensor versions) cannot be traced; weights do not
        # change inside a compiled inference graph, so the copy enable_lut built is used as is.
        cached = getattr(layer, "_lut", None)
        w = cached[1] if cached is not None else None
    else:
        w = prepare_layer(layer)
    if w is None:
        return None
    y = w.matmul(x)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


def register() -> None:
    for bits in (2, 3, 4):
        register_fast_path("*", bits, "cpu", lut_fast_path, name="lut")
