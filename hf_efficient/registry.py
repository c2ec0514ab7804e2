"""The one registry of hf-efficient.

Every capability declares what it contributes (a quantization method, an attention function, a
CLI subcommand, a row of the demo) by calling one ``add_*`` function at import time of its own
module; :func:`register_all` imports the capability modules listed in :data:`CAPABILITY_MODULES`
and then hands the transformers-facing entries to transformers. Adding a capability is one line
in that tuple. Nothing else in the package talks to transformers' registries.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# Modules whose import contributes entries. Order is the order of demo rows and CLI commands.
CAPABILITY_MODULES: tuple[str, ...] = (
    "hf_efficient.commands",
    "hf_efficient.attention.seer",
    "hf_efficient.quantization.afpq",
    "hf_efficient.quantization.mofq",
    "hf_efficient.quantization.api",
    "hf_efficient.quantization.gpu",
    "hf_efficient.quantization.lut",
    "hf_efficient.optim.demo",
)


@dataclass(frozen=True)
class QuantizationMethod:
    name: str
    config_cls: type
    quantizer_cls: type


@dataclass(frozen=True)
class AttentionFunction:
    name: str
    fn: Callable[..., Any]
    mask_fn: Callable[..., Any] | None


@dataclass(frozen=True)
class Command:
    """A ``hf-efficient <name>`` subcommand: ``configure(parser)`` adds arguments, ``run(args)`` runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


@dataclass(frozen=True)
class DemoRow:
    """One row of the main job: ``build(base_model_path, device) -> model`` (None when not applicable)."""

    name: str
    description: str
    build: Callable[..., Any]
    default: bool = True


@dataclass
class Registry:
    quantization: dict[str, QuantizationMethod] = field(default_factory=dict)
    attention: dict[str, AttentionFunction] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    demo_rows: dict[str, DemoRow] = field(default_factory=dict)

    def _add(self, table: dict, entry) -> None:
        old = table.get(entry.name)
        if old is not None and old != entry:
            raise ValueError(f"hf_efficient registry: {type(entry).__name__} {entry.name!r} is already registered "
                             f"with a different definition")
        table[entry.name] = entry


REGISTRY = Registry()
_applied: set[tuple[str, str]] = set()


def add_quantization_method(name: str, config_cls: type, quantizer_cls: type) -> None:
    REGISTRY._add(REGISTRY.quantization, QuantizationMethod(name, config_cls, quantizer_cls))


def add_attention(name: str, fn: Callable[..., Any], mask_fn: Callable[..., Any] | None = None) -> None:
    REGISTRY._add(REGISTRY.attention, AttentionFunction(name, fn, mask_fn))


def add_command(name: str, help: str, configure, run) -> None:
    REGISTRY._add(REGISTRY.commands, Command(name, help, configure, run))


def add_demo_row(name: str, description: str, build, default: bool = True) -> None:
    REGISTRY._add(REGISTRY.demo_rows, DemoRow(name, description, build, default))


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
        if qauto.AUTO_QUANTIZER_MAPPING.get(m.name) is not m.quantizer_cls:
            qauto.register_quantizer(m.name)(m.quantizer_cls)
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
