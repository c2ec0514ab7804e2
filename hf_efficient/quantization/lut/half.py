"""Embedding tables (and an output head tied to them) kept in float16 while the model computes in float32.

A quantized small model's largest float tensor is its embedding table, usually tied to the output head and
left unquantized (SmolLM2-135M: 49152 x 576, 108 MiB in float32 beside ~55 MiB of 4-bit layers).
:func:`keep_embeddings_in` stores it in float16: half the bytes, and a decode step's head reads half as much.
The embedding lookup widens the looked-up rows to the compute dtype; the head multiplies float32 activations
by the widened weights (C++ ``half_gemm`` on the CPU: exact widening, float32 products and sums, so only the
rounding of the stored weights and the order of the sums differ from float32). The cost is that rounding:
measured on the main job in docs/lut.md. ``load_model(..., embedding_dtype=torch.float16)`` converts each
table as it is read (:mod:`hf_efficient.models`).

The tables become buffers of their modules (same names, so the state dict keeps its keys): as parameters they
would make transformers' ``model.dtype`` (its first floating parameter) report float16 and create float16
caches. Inference only: the tables are not trained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import lut_cpu as kernel

_HALF_GEMM = None


def _half_gemm_op():
    # Cached: a torch.ops attribute lookup is not free and the head runs once per decode step.
    global _HALF_GEMM
    if _HALF_GEMM is None:
        _HALF_GEMM = kernel.ops().half_gemm.default
    return _HALF_GEMM


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight.to(x.dtype), bias)`` for a float16 ``weight`` without widening all of it at once.

    Float32 inputs on the CPU run the C++ kernel (the widened weight is never materialised); anything else (other
    dtypes or devices, inputs that need gradients, tracing) runs the reference.
    """
    if (x.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float16 and weight.is_cpu
            and kernel.available() and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad)):
        y = _half_gemm_op()(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias.to(y.dtype)
    return half_linear_reference(x, weight, bias)


def half_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-torch twin of :func:`half_linear` (widens the whole weight)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class HalfEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table is stored in a narrower dtype; looked-up rows come out in ``compute_dtype``."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(self.compute_dtype)


class HalfHead(nn.Linear):
    """An ``nn.Linear`` output head whose weight is stored in float16 (see :func:`half_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_linear(x, self.weight, self.bias)


def _as_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    module.register_buffer(name, tensor)


def keep_embeddings_in(model: nn.Module, dtype: torch.dtype = torch.float16,
                       compute_dtype: torch.dtype | None = None) -> list[str]:
    """Store every ``nn.Embedding`` table of ``model`` (and the output head if it is an ``nn.Linear`` tied to
    one) in ``dtype``; lookups and the head still compute in ``compute_dtype`` (default: the table's dtype
    before the conversion, float32 if it already was ``dtype``). Returns the names of the converted modules.
    """
    if not (dtype.is_floating_point and torch.finfo(dtype).bits < 32):
        raise ValueError(f"keep_embeddings_in: dtype must be a float type narrower than float32, got {dtype}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head.weight if isinstance(head, nn.Linear) else None
    names, converted = [], {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Embedding):
            continue
        w = m.weight
        compute = compute_dtype or (w.dtype if w.dtype != dtype else torch.float32)
        table = w.detach().to(dtype)
        converted[id(w)] = table
        _as_buffer(m, "weight", table)
        m.__class__ = HalfEmbedding
        m.compute_dtype = compute
        names.append(name)
    if head_weight is not None and id(head_weight) in converted:
        _as_buffer(head, "weight", converted[id(head_weight)])
        if head.bias is not None:
            head.bias.requires_grad_(False)
        head.__class__ = HalfHead
        names.append(next(n for n, m in model.named_modules() if m is head))
    return names
