"""hf-efficient: efficient-LLM research as Hugging Face plugins.

``import hf_efficient`` registers every capability of the suite with transformers (see
:mod:`hf_efficient.registry`); a checkpoint saved with one of our quantization methods reloads
with plain ``from_pretrained`` only after this import.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import registry as _registry

_registry.register_all()

__all__ = ["__version__"]
