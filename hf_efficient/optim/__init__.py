"""Memory-saving optimizers: :class:`AdamA` (Adam accumulation) and its Trainer wiring.

Names resolve lazily so ``import hf_efficient`` (which registers the ``adama-demo`` command) does
not import torch or transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"AdamA": ".adama", "AdamACallback": ".trainer", "adama_optimizers": ".trainer"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
