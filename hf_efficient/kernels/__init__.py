"""Triton and CUDA GPU kernels of hf-efficient (``hf_efficient.kernels``).

Rules of this package: import nothing from transformers/peft/accelerate; every kernel has a
pure-torch twin beside it (``<kernel>_reference.py``, e.g. ``quant_reference.py``) that is both the
test oracle and the fallback; kernels are exposed to models as ``torch.library`` ops (see :mod:`hf_efficient.ops`).
On a machine without CUDA the kernels still run under ``TRITON_INTERPRET=1`` (small shapes, tests).
"""
from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON"]
