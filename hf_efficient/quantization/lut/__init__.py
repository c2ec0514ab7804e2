"""T-MAC on the CPU: low-bit weight x float activation matmuls by table lookup, without dequantization.

Registers quant_method ``"lut"`` (:class:`LUTConfig`) with transformers, the LUT kernels as the CPU fast path
of QuantLinear layers (:func:`enable_lut`), a fused one-token decode step for Llama-style layers
(:func:`enable_fast_decode`, on by default through ``enable_lut``); the demo rows live in :mod:`hf_efficient.cli.demo_rows`.
Kernels: ``csrc/lut_gemm.cpp`` (glue :mod:`hf_efficient.kernels.lut_cpu`, plain-torch twin
:mod:`hf_efficient.kernels.lut_cpu_reference`); design notes: ``docs/lut.md``.
"""
from __future__ import annotations

from ... import registry
from .config import LUTConfig
from .decode import enable_fast_decode
from .layer import MAX_LUT_ROWS, enable_lut, register as _register_fast_path


_register_fast_path()
registry.add_quantization_method("lut", LUTConfig)  # LUTConfig.after_load permutes into the kernel layout

__all__ = ["LUTConfig", "enable_lut", "enable_fast_decode", "MAX_LUT_ROWS"]
