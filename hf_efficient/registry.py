"""The one registry of hf-efficient: what the capabilities hand to transformers.

Every capability declares what it contributes to transformers (a quantization config, an attention
function) by calling one ``add_*`` function at import time of its own module; :func:`register_all`
imports the modules listed in :data:`CAPABILITY_MODULES` and then hands the entries to transformers.
Adding a capability is one line in that tuple. Nothing else in the package talks to transformers'
registries.

Capabilities register a config class only; this module pairs it with the one generic quantizer
(:class:`hf_efficient.integrations.transformers.HfEfficientQuantizer`), so no capability imports the
integrations layer. A method needing work after loading says so on its config (``after_load(model)``,
``compileable``), not with a quantizer subclass. CLI subcommands live in :mod:`hf_efficient.cli`, demo
rows in :mod:`hf_efficient.cli.demo_rows`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# Modules whose import contributes entries.
CAPABILITY_MODULES: tuple[str, ...] = (
    "hf_efficient.attention.seer",
    "hf_efficient.quantization.afpq",
    "hf_efficient.quantization.mofq",
    "hf_efficient.quantization.gpu",
    "hf_efficient.quantization.lut",
)


@dataclass(frozen=True)
class QuantizationMethod:
    name: str
    config_cls: type
    quantizer_cls: type | None = None  # None: the generic HfEfficientQuantizer

    def quantizer(self) -> type:
        if self.quantizer_cls is not None:
            return self.quantizer_cls
        from .integrations.transformers import HfEfficientQuantizer

        return HfEfficientQuantizer


@dataclass(frozen=True)
class AttentionFunction:
    name: str
    fn: Callable[..., Any]
    mask_fn: Callable[..., Any] | None


@dataclass
class Registry:
    quantization: dict[str, QuantizationMethod] = field(default_factory=dict)
    attention: dict[str, AttentionFunction] = field(default_factory=dict)

    def _add(self, table: dict, entry) -> None:
        old = table.get(entry.name)
        if old is not None and old != entry:
            raise ValueError(f"hf_efficient registry: {type(entry).__name__} {entry.name!r} is already registered "
                             f"with a different definition")
        table[entry.name] = entry


REGISTRY = Registry()
_applied: set[tuple[str, str]] = set()


def add_quantization_method(name: str, config_cls: type, quantizer_cls: type | None = None) -> None:
    """Register quant_method ``name`` for ``config_cls`` (a QuantConfigBase subclass).

    ``quantizer_cls`` is for tests and outside plugins; our methods leave it None (the generic quantizer)."""
    REGISTRY._add(REGISTRY.quantization, QuantizationMethod(name, config_cls, quantizer_cls))


def add_attention(name: str, fn: Callable[..., Any], mask_fn: Callable[..., Any] | None = None) -> None:
    REGISTRY._add(REGISTRY.attention, AttentionFunction(name, fn, mask_fn))


def _apply_to_transformers() -> None:
    """Hand quantization methods and attention functions to transformers (idempotent)."""
    if not REGISTRY.quantization and not REGISTRY.attention:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.quantizers import auto as qauto

    for m in REGISTRY.quantization.values():
        if ("quant", m.name) in _applied:
            continue
        known_cfg = qauto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(m.name)
        if known_cfg is not None and known_cfg is not m.config_cls:
            raise ValueError(f"quantization method {m.name!r} is already registered in transformers by "
                             f"{known_cfg.__module__}.{known_cfg.__qualname__}")
        if known_cfg is None:
            qauto.register_quantization_config(m.name)(m.config_cls)
        quantizer = m.quantizer()
        if qauto.AUTO_QUANTIZER_MAPPING.get(m.name) is not quantizer:
            qauto.register_quantizer(m.name)(quantizer)
        _applied.add(("quant", m.name))
    for a in REGISTRY.attention.values():
        if ("attn", a.name) in _applied:
            continue
        AttentionInterface.register(a.name, a.fn)
        if a.mask_fn is not None:
            AttentionMaskInterface.register(a.name, a.mask_fn)
        _applied.add(("attn", a.name))


def register_all() -> Registry:
    """Import every capability module and register its entries with transformers. Safe to call twice."""
    for mod in CAPABILITY_MODULES:
        importlib.import_module(mod)
    _apply_to_transformers()
    return REGISTRY
