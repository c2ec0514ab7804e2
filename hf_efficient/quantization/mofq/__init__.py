"""MoFQ: per layer, INT or FP at the same bit width, whichever quantizes that layer better.

Registers quant_method ``"mofq"`` with transformers and the demo row ``mofq-w4``.
"""
from __future__ import annotations

from ... import registry
from ...integrations.transformers import HfEfficientQuantizer
from .config import MoFQConfig


def build_demo(base, device="cpu", dtype=None):
    """Demo row: W4 mixture of INT4/FP4 (per-layer weight MSE), group 128, RTN on load."""
    import torch

    from ...models import load_model

    return load_model(base, dtype=dtype or torch.float32, device=device,
                      quantization_config=MoFQConfig(bits=4, group_size=128))[0]


registry.add_quantization_method("mofq", MoFQConfig, HfEfficientQuantizer)
registry.add_demo_row("mofq-w4", "MoFQ W4 (INT4 vs FP4-E2M1 per layer by weight MSE), group 128, RTN on load",
                      build_demo)

__all__ = ["MoFQConfig"]
