"""T-MAC on the CPU: low-bit weight x float activation matmuls by table lookup, without dequantization.

Registers quant_method ``"lut"`` (:class:`LUTConfig`) with transformers, the LUT kernels as the CPU fast path
of opted-in QuantLinear layers (:func:`enable_lut`), and the demo rows ``lut-int4-g128`` / ``lut-int2-g64``.
Kernels: ``csrc/lut_gemm.cpp``; plain-torch twin: :mod:`.reference`; design notes: ``docs/lut.md``.
"""
from __future__ import annotations

from ... import registry
from ...integrations.transformers import HfEfficientQuantizer
from .config import LUTConfig
from .layer import MAX_LUT_ROWS, enable_lut, register as _register_fast_path


class LUTQuantizer(HfEfficientQuantizer):
    """The generic quantizer, plus: permute every layer into the LUT kernel layout once after loading."""

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        enable_lut(model)
        return model

    @property
    def is_compileable(self) -> bool:
        return True


def _build(bits: int, group_size: int):
    def build(base, device="cpu", dtype=None):
        import torch

        from ...models import load_model

        return load_model(base, dtype=torch.float32, device=device,
                          quantization_config=LUTConfig(bits=bits, group_size=group_size))[0]

    return build


_register_fast_path()
registry.add_quantization_method("lut", LUTConfig, LUTQuantizer)
registry.add_demo_row("lut-int4-g128", "LUT (T-MAC) INT4 zero-point g128, RTN on load; CPU LUT kernels for decode",
                      _build(4, 128))
registry.add_demo_row("lut-int2-g64", "LUT (T-MAC) INT2 zero-point g64, RTN on load; CPU LUT kernels for decode",
                      _build(2, 64))

__all__ = ["LUTConfig", "LUTQuantizer", "enable_lut", "MAX_LUT_ROWS"]
