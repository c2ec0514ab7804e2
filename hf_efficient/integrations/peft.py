"""peft LoRA on hf-efficient's quantized layers: one LoRA layer class for every QuantLinear format.

peft refuses module classes it does not know; :func:`register_lora` maps ``QuantLinear`` to
:class:`QuantLoraLinear` on a ``LoraConfig`` (peft's custom-module hook is private API, so it is wrapped
here once). :func:`get_peft_model` does that and calls peft's. The mapping is not saved in
``adapter_config.json``: call :func:`register_lora` on the config again before ``PeftModel.from_pretrained``
(or use :func:`load_adapter`).
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..quantization.linear import QuantLinear

UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias")


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA adapter around a frozen :class:`QuantLinear`: ``y = base(x) + B(A(dropout(x))) * scaling``.

    Plain LoRA (and rsLoRA's scaling) only. What it does not do it refuses with a ``ValueError`` /
    ``NotImplementedError`` instead of silently running plain LoRA: DoRA (``use_dora``; its magnitude
    vector needs the dequantized weight norm per step), ``lora_bias``, mixed-adapter batches
    (``adapter_names=`` in forward/generate), and merging (the base stays packed; merging would need
    re-quantization).
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        super().__init__()
        for option in UNSUPPORTED_OPTIONS:
            if kwargs.get(option) or getattr(config, option, False):
                raise ValueError(f"LoraConfig({option}=True) is not supported on hf-efficient's quantized layers "
                                 f"({base_layer.fmt.name}); use plain LoRA ({option}=False)")
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **_update_kwargs(kwargs))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("mixed-adapter batches (adapter_names=...) are not supported on "
                                      "hf-efficient's quantized layers; activate one adapter set with "
                                      "model.set_adapter(...) instead")
        out = self.base_layer(x)
        if self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a = self.lora_A[name]
            x_a = x.to(a.weight.dtype)
            out = out + (self.lora_B[name](a(self.lora_dropout[name](x_a))) * self.scaling[name]).to(out.dtype)
        return out

    def merge(self, *args, **kwargs):
        raise NotImplementedError("merging LoRA into a packed low-bit QuantLinear would need re-quantization; "
                                  "keep the adapter separate or dequantize the base model first")

    def unmerge(self, *args, **kwargs):
        raise NotImplementedError("QuantLoraLinear never merges")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _update_kwargs(kwargs: dict) -> dict:
    # peft passes every LoraConfig-derived option; update_layer accepts a version-dependent subset.
    import inspect

    accepted = inspect.signature(LoraLayer.update_layer).parameters
    if any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in accepted}


def register_lora(lora_config):
    """Teach ``lora_config`` (a peft ``LoraConfig``) to wrap our QuantLinear layers; returns it."""
    lora_config._register_custom_module({QuantLinear: QuantLoraLinear})
    return lora_config


def get_peft_model(model, lora_config, **kwargs):
    """``peft.get_peft_model`` after :func:`register_lora`: only LoRA weights train, the base stays frozen."""
    import peft

    return peft.get_peft_model(model, register_lora(lora_config), **kwargs)


def load_adapter(model, adapter_dir, **kwargs):
    """``PeftModel.from_pretrained`` for adapters trained on our quantized layers."""
    from peft import PeftConfig, PeftModel

    cfg = register_lora(PeftConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(model, adapter_dir, config=cfg, **kwargs)
