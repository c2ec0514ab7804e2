"""MoFQ: per layer, INT or FP at the same bit width, whichever quantizes that layer better.

Registers quant_method ``"mofq"`` with transformers (the registry pairs it with the generic quantizer).
"""
from __future__ import annotations

from ... import registry
from .config import MoFQConfig

registry.add_quantization_method("mofq", MoFQConfig)

__all__ = ["MoFQConfig"]
