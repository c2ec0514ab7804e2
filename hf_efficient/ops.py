"""Python side of the ``torch.ops.hf_efficient`` library.

C++ CPU kernels (csrc/, module ``hf_efficient._C``) define op schemas with ``TORCH_LIBRARY_FRAGMENT``;
this module loads them, adds fake (meta) implementations so ``torch.compile`` and meta-device loading
trace through them, and adds CUDA implementations backed by the Triton kernels of
:mod:`hf_efficient.kernels`. Call sites use ``torch.ops.hf_efficient.<name>``.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    from . import _C  # noqa: F401  (import registers the C++ ops)

    HAS_CPP_OPS = True
except ImportError as e:  # an install without the build step (e.g. a source checkout on PYTHONPATH)
    HAS_CPP_OPS = False
    logger.warning("hf_efficient C++ ops are not built (%s); reinstall with "
                   "`pip install --no-build-isolation .`", e)


if HAS_CPP_OPS:
    @torch.library.register_fake("hf_efficient::scale_add")
    def _scale_add_fake(x, y, alpha):
        torch._check(x.shape == y.shape, lambda: "scale_add: x and y must have the same shape")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.impl("hf_efficient::scale_add", "CUDA")
    def _scale_add_cuda(x, y, alpha):
        from .kernels.scale_add import scale_add

        return scale_add(x, y, alpha)


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + y`` through the op library (C++ on CPU, Triton on CUDA)."""
    return torch.ops.hf_efficient.scale_add(x, y, alpha)
