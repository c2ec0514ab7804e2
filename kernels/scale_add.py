"""Fused ``alpha * x + y`` in Triton: the smallest kernel, proving the GPU and interpreter paths."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * x + y).to(out_ptr.dtype.element_ty), mask=mask)


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float, block: int = 1024) -> torch.Tensor:
    """``alpha * x + y`` for same-shape, same-dtype tensors (fp32/fp16/bf16), fp32 arithmetic."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"scale_add: x and y must match in shape/dtype/device, got "
                         f"{tuple(x.shape)}/{x.dtype}/{x.device} and {tuple(y.shape)}/{y.dtype}/{y.device}")
    xc, yc = x.contiguous(), y.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _scale_add_kernel[(triton.cdiv(n, block),)](xc, yc, out, n, float(alpha), BLOCK=block)
    return out
