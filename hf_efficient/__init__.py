"""hf-efficient: efficient-LLM research as Hugging Face plugins.

``import hf_efficient`` registers every capability of the suite with transformers (see
:mod:`hf_efficient.registry`); a checkpoint saved with one of our quantization methods reloads
with plain ``from_pretrained`` only after this import.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import registry as _registry

_registry.register_all()

from .quantization.afpq import AFPQConfig  # noqa: E402
from .quantization.api import load_config_file as load_quant_config, quantize  # noqa: E402
from .quantization.mofq import MoFQConfig  # noqa: E402

__all__ = ["__version__", "AFPQConfig", "MoFQConfig", "quantize", "load_quant_config"]
