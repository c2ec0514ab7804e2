"""``MoFQConfig``: per layer, the better of an INT and an FP format at the same bit width."""
from __future__ import annotations

from collections import Counter

from ... import formats
from ..config import LayerSpec, QuantConfigBase, _err

DEFAULT_CANDIDATES = {4: ["int4_sym", "fp4_sym"], 8: ["int8_sym", "fp8_sym"]}
SELECTIONS = ("weight_mse", "output_error")


class MoFQConfig(QuantConfigBase):
    """Mixture-of-formats quantization (MoFQ) as a transformers config.

    Args:
        bits: 4 (W4: INT4 vs FP4-E2M1) or 8 (W8: INT8 vs FP8-E4M3); other widths need explicit ``candidates``.
        group_size: columns per scale group (default 128; -1 per-channel, the usual choice for W8A8).
        candidates: format names to choose from (default by bits, symmetric as in the paper).
        act_bits: None (weight-only) or 8: activations are quantized per token, in INT8 for layers that chose
            INT and FP8-E4M3 for layers that chose FP (W8A8).
        selection: "weight_mse" (per-layer weight MSE; works on load) or "output_error" (per-layer output
            error on calibration batches with activations quantized too; default when ``act_bits`` is set;
            needs :func:`hf_efficient.quantization.quantize`).
        layer_formats: {module name: chosen format}, filled by the selection and saved in the checkpoint.
    """

    quant_method_name = "mofq"

    def __init__(self, bits: int = 4, group_size: int = 128, candidates: list[str] | None = None,
                 act_bits: int | None = None, selection: str | None = None,
                 layer_formats: dict[str, str] | None = None, **kwargs):
        self.candidates = list(candidates) if candidates is not None else DEFAULT_CANDIDATES.get(bits)
        self.act_bits = act_bits
        self.selection = selection or ("output_error" if act_bits else "weight_mse")
        self.layer_formats = dict(layer_formats or {})
        super().__init__(bits=bits, group_size=group_size, **kwargs)
        if self.candidates is None:
            raise _err("bits", bits, f"MoFQ has default candidates for bits {sorted(DEFAULT_CANDIDATES)}; "
                                     f"pass candidates=[...] for other widths")
        if not self.candidates:
            raise _err("candidates", candidates, "a non-empty list of format names")
        for c in self.candidates:
            f = formats.get_format(c)
            if f.bits != bits:
                raise _err("candidates", self.candidates, f"formats with bits={bits} ({c} has {f.bits})")
        if self.selection not in SELECTIONS:
            raise _err("selection", self.selection, f"one of {SELECTIONS}")
        if act_bits is not None:
            if act_bits != 8:
                raise _err("act_bits", act_bits, "None or 8")
            for c in self.candidates:
                if formats.get_format(c).kind not in ("int", "fp"):
                    raise _err("candidates", self.candidates, "int or fp formats when act_bits is set")
        for name, f in self.layer_formats.items():
            if formats.get_format(f).name not in self.candidates:
                raise _err("layer_formats", {name: f}, f"formats among candidates {self.candidates}")

    def act_format(self, weight_fmt: str) -> str | None:
        if self.act_bits is None:
            return None
        return formats.format_name(formats.get_format(weight_fmt).kind, self.act_bits, True)

    def layer_spec(self, name: str) -> LayerSpec:
        fmt = self.layer_formats.get(name, self.candidates[0])
        return LayerSpec(fmt, self.group_size_or_none(), self.act_format(fmt))

    def needs_calibration(self) -> str | None:
        reason = super().needs_calibration()
        if reason:
            return reason
        if self.layer_formats:
            return None
        if self.selection == "output_error":
            return "selection='output_error' (W8A8) measures layer outputs on calibration data"
        layouts = {formats.get_format(c).param_names for c in self.candidates}
        if len(layouts) > 1:
            return (f"candidates {self.candidates} store different tensors, so the choice must be made before "
                    f"the layers are built")
        return None

    def choose_format(self, name: str, weight, inputs=None) -> str:
        from . import select

        if name in self.layer_formats:
            return self.layer_formats[name]
        if self.selection == "weight_mse":
            errors = select.weight_errors(weight, self.candidates, self.group_size_or_none(), self.scale_torch_dtype,
                                          name)
        else:
            if inputs is None:
                raise ValueError(f"MoFQ selection='output_error' needs calibration inputs for layer {name}")
            errors = select.output_errors(weight, inputs, self.candidates, self.group_size_or_none(),
                                          self.scale_torch_dtype, self.act_format, name)
        return select.best(errors)

    def record_choice(self, name: str, fmt: str) -> None:
        self.layer_formats[name] = fmt

    def summary(self) -> str:
        if not self.layer_formats:
            return "MoFQ: no layer quantized yet"
        counts = Counter(self.layer_formats.values())
        parts = ", ".join(f"{n} x {f}" for f, n in sorted(counts.items()))
        by_kind = Counter(formats.get_format(f).kind.upper() for f in self.layer_formats.values())
        kinds = " vs ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
        return f"MoFQ W{self.bits}{'A' + str(self.act_bits) if self.act_bits else ''}: " \
               f"{len(self.layer_formats)} layers: {kinds} ({parts}; selection by {self.selection})"
