"""AFPQ: asymmetric FP/NF quantization with separate scales for the positive and negative halves of a group.

Registers quant_method ``"afpq"`` with transformers and the demo row ``afpq-fp4-g128``.
"""
from __future__ import annotations

from ... import registry
from ...integrations.transformers import HfEfficientQuantizer
from .config import AFPQConfig


def build_demo(base, device="cpu", dtype=None):
    """Demo row: the base model quantized on load (RTN) with the afpq-fp4-g128 recipe."""
    import torch

    from ...models import load_model

    return load_model(base, dtype=dtype or torch.float32, device=device,
                      quantization_config=AFPQConfig(bits=4, group_size=128, fmt="fp"))[0]


registry.add_quantization_method("afpq", AFPQConfig, HfEfficientQuantizer)
registry.add_demo_row("afpq-fp4-g128", "AFPQ FP4-E2M1 two-scale, group 128, RTN on load (reference dequant path)",
                      build_demo)

__all__ = ["AFPQConfig"]
