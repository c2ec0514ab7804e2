"""MoFQ: per layer, the format of one bit width (INT / FP / NF, asym or sym) that quantizes that layer best.

Registers quant_method ``"mofq"`` with transformers (the registry pairs it with the generic quantizer).
"""
from __future__ import annotations

from ... import registry
from .config import MoFQConfig

registry.add_quantization_method("mofq", MoFQConfig)

__all__ = ["MoFQConfig"]
