"""Low-bit weight quantization: packed storage, the QuantLinear module, RTN/GPTQ algorithms, AFPQ and MoFQ.

Light imports only (torch); the transformers glue lives in :mod:`hf_efficient.integrations.transformers`.
"""
from __future__ import annotations

from .linear import QuantLinear, reference_only, register_fast_path, unregister_fast_path
from .packing import FORMAT_VERSION, pack_codes, unpack_codes

__all__ = ["QuantLinear", "register_fast_path", "unregister_fast_path", "reference_only", "pack_codes",
           "unpack_codes", "FORMAT_VERSION"]
