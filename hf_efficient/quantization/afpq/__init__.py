"""AFPQ: asymmetric FP/NF quantization with separate scales for the positive and negative halves of a group.

Registers quant_method ``"afpq"`` with transformers (the registry pairs it with the generic quantizer).
"""
from __future__ import annotations

from ... import registry
from .config import AFPQConfig

registry.add_quantization_method("afpq", AFPQConfig)

__all__ = ["AFPQConfig"]
