"""The main job's rows, in one table: the fp32 baseline, then one row per feature.

A row is data: a name, what it is, what runs its matmuls, and the quantization recipe (a name in
``hub_configs/``) applied on load, or None for the float model. Adding a row is one line in :data:`ROWS`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoRow:
    name: str
    description: str
    kernel: str  # what runs the linear layers on the CPU, for the legend
    recipe: str | None = None  # hub_configs/<recipe>.json, quantized on load (RTN); None: the float model
    default: bool = True
    # Why this row is expected to be far worse than fp32 (shown beside its numbers), or None.
    expected_broken: str | None = None
    # Storage dtype of the (tied) embedding table, part of the row's recipe (None: the model's dtype). The
    # quantized rows keep it in float16: their largest float tensor, halved at a rounding cost shown in docs/lut.md.
    embedding_dtype: str | None = None

    def build(self, base, device: str = "cpu", dtype=None):
        """The row's model from the float model directory ``base``."""
        import torch

        from ..models import load_model

        kwargs = {}
        if self.embedding_dtype is not None:
            kwargs["embedding_dtype"] = getattr(torch, self.embedding_dtype)
        if self.recipe is not None:
            from ..quantization.api import load_config_file

            kwargs["quantization_config"] = load_config_file(self.recipe)
        return load_model(base, dtype=dtype or torch.float32, device=device, **kwargs)[0]


_FP16_EMB = "tied embedding/head stored in fp16 (fp16-weight GEMV head)"

ROWS: tuple[DemoRow, ...] = (
    DemoRow("fp32", "unmodified model, float32", "torch fp32 matmul"),
    DemoRow("afpq-fp4-g128", "AFPQ FP4-E2M1 two-scale (s_pos/s_neg), group 128, RTN on load; " + _FP16_EMB,
            "C++ LUT GEMV, code-indexed two-channel tables (decode) / dequantize + matmul (prefill)", "afpq-fp4-g128",
            embedding_dtype="float16"),
    DemoRow("mofq-w4", "MoFQ W4: INT4 or FP4-E2M1 per layer by weight MSE, group 128, RTN on load; " + _FP16_EMB,
            "C++ LUT GEMV (decode) / dequantize + matmul (prefill)", "mofq-w4", embedding_dtype="float16"),
    DemoRow("lut-int4-g128", "T-MAC LUT INT4 with zero point, group 128, RTN on load; " + _FP16_EMB,
            "C++ LUT GEMV (decode) / dequantize + matmul (prefill)", "lut-int4-g128", embedding_dtype="float16"),
    DemoRow("lut-int2-g64", "T-MAC LUT INT2 with zero point, group 64, RTN on load (kernel speed/size demo); "
            + _FP16_EMB, "C++ LUT GEMV (decode) / dequantize + matmul (prefill)", "lut-int2-g64",
            embedding_dtype="float16",
            expected_broken="INT2 round-to-nearest keeps about half of each weight of this 135M model (relative "
                            "weight error 0.47); the dequantize reference gives the same perplexity as the LUT "
                            "kernel, so the recipe, not the kernel, breaks it: 2 bits need calibration (GPTQ) "
                            "and a larger model (docs/lut.md)"),
)

BY_NAME = {r.name: r for r in ROWS}
