"""BitDistiller: sub-4-bit quantization-aware training with self-distillation (CAKLD).

Parts: :class:`BitDistillerConfig` (config), :mod:`.fake_quant` (STE fake quantization, export to packed
QuantLinear), :mod:`.clip` (asymmetric clipping init), :mod:`.loss` (CAKLD / KL / CE), :mod:`.data`
(teacher-generated training text) and :class:`BitDistillerCallback` (Trainer glue). See docs/bitdistiller.md.
"""
from __future__ import annotations

from .clip import init_clipping, search_clip
from .config import BitDistillerConfig
from .data import generate_training_data
from .fake_quant import FakeQuantLinear, convert, fake_quant_disabled, fake_quantize_weight, prepare_qat
from .loss import distill_loss, kl_per_token
from .trainer import BitDistillerCallback

__all__ = ["BitDistillerConfig", "BitDistillerCallback", "FakeQuantLinear", "prepare_qat", "convert",
           "fake_quant_disabled", "fake_quantize_weight", "init_clipping", "search_clip", "distill_loss",
           "kl_per_token", "generate_training_data"]
