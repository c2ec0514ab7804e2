"""hf-efficient: efficient-LLM research as Hugging Face plugins.

``import hf_efficient`` registers every capability of the suite with transformers (see
:mod:`hf_efficient.registry`); a checkpoint saved with one of our quantization methods reloads
with plain ``from_pretrained`` only after this import.
"""
from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

_EXPORTS = {"AFPQConfig": ".quantization.afpq", "MoFQConfig": ".quantization.mofq",
            "LUTConfig": ".quantization.lut", "quantize": ".quantization.api",
            "load_quant_config": (".quantization.api", "load_config_file"),
            "enable_pregated_offload": ".moe", "EnergyTuneConfig": ".energy", "EnergyMeter": ".energy",
            "L0PruningConfig": ".pruning", "PruningTrainer": ".pruning", "PrunedParakeetForCTC": ".pruning",
            "BitDistillerConfig": ".distill", "BitDistillerCallback": ".distill"}
__all__ = ["__version__", *_EXPORTS]


def _invoked_as_cli() -> bool:
    # The `hf-efficient` console script imports this package only to reach hf_efficient.cli, and
    # `hf-efficient --help` must not pay for torch + transformers (~10 s on a small CPU): the CLI
    # registers everything itself before it runs a command.
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("hf-efficient", "hf-efficient.exe")


# Submodules reachable as attributes after a bare `import hf_efficient` (hf_efficient.models.load_default()).
_SUBMODULES = ("models", "data", "evaluation", "formats", "checkpoint", "quantization", "attention", "optim",
               "integrations")


def __getattr__(name):
    if name in _EXPORTS:
        mod, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(mod, __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _invoked_as_cli():
    from . import registry as _registry

    _registry.register_all()
