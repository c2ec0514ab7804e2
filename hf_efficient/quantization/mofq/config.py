"""``MoFQConfig``: per layer, the best of several formats (INT / FP / NF, symmetric or asymmetric) at one bit width."""
from __future__ import annotations

from collections import Counter

from ... import formats
from ..config import LayerSpec, QuantConfigBase, _err

# "all": every format of the catalog at that width (the asymmetric ones are our best single formats, so the
# per-layer choice must see them); "sym": the MoFQ paper's INT-vs-FP pair, one layout, chosen on load.
CANDIDATE_SETS = {
    "all": {b: [f"{k}{b}_{s}" for s in ("asym", "sym") for k in ("int", "fp", "nf") if f"{k}{b}_{s}" in formats.FORMATS]
            for b in (2, 3, 4)} | {8: ["int8_sym", "fp8_sym"]},
    "sym": {4: ["int4_sym", "fp4_sym"], 3: ["int3_sym", "fp3_sym"], 8: ["int8_sym", "fp8_sym"]},
}
DEFAULT_CANDIDATES = CANDIDATE_SETS["all"]
SELECTIONS = ("weight_mse", "output_error", "relative_output_error")


class MoFQConfig(QuantConfigBase):
    """Mixture-of-formats quantization (MoFQ) as a transformers config.

    Args:
        bits: 2, 3, 4 or 8 (weights).
        group_size: columns per scale group (default 128; -1 per-channel, the usual choice for W8A8).
        candidates: format names to choose from, or a set name: "all" (default: INT-asym, AFPQ FP-asym and
            NF-asym two-scale, INT/FP/NF-sym of that width; INT8/FP8 at 8 bits) or "sym" (the paper's INT-sym vs
            FP-sym pair, which can be chosen on load).
        act_bits: None (weight-only) or 8: activations are quantized per token, in INT8 for layers that chose
            INT and FP8-E4M3 for layers that chose FP (W8A8).
        selection: "output_error" (the paper's criterion: mean squared error of the layer's output on
            calibration inputs, activations quantized too under W8A8; needs
            :func:`hf_efficient.quantization.quantize`), "relative_output_error" (the same with each token's
            error divided by its squared output norm, so that a few attention-sink tokens with huge outputs do
            not decide the choice alone) or "weight_mse" (weight MSE; works on load when every candidate stores
            the same tensors). Default: "weight_mse" when that works on load, else "output_error".
        selection_tokens: calibration tokens per layer input on which output errors are measured (default
            512; with ``algorithm="rtn"`` only as many calibration windows as hold them are run).
        layer_formats: {module name: chosen format}, filled by the selection and saved in the checkpoint.
        With ``algorithm="gptq"`` the chosen format of each layer is then quantized with GPTQ.
    """

    quant_method_name = "mofq"

    def __init__(self, bits: int = 4, group_size: int = 128, candidates: list[str] | str | None = None,
                 act_bits: int | None = None, selection: str | None = None, selection_tokens: int = 512,
                 layer_formats: dict[str, str] | None = None, **kwargs):
        if isinstance(candidates, str):
            if candidates not in CANDIDATE_SETS:
                raise _err("candidates", candidates, f"a list of format names or one of {sorted(CANDIDATE_SETS)}")
            candidates = CANDIDATE_SETS[candidates].get(bits)
            if candidates is None:
                raise _err("bits", bits, f"this candidate set exists for bits {sorted(CANDIDATE_SETS['sym'])}")
        self.candidates = list(candidates) if candidates is not None else DEFAULT_CANDIDATES.get(bits)
        self.act_bits = act_bits
        if self.candidates is None:
            raise _err("bits", bits, f"MoFQ has default candidates for bits {sorted(DEFAULT_CANDIDATES)}; "
                                     f"pass candidates=[...] for other widths")
        one_layout = len({formats.get_format(c).param_names for c in self.candidates}) == 1
        self.selection = selection or ("weight_mse" if one_layout and not act_bits else "output_error")
        self.selection_tokens = selection_tokens
        self.layer_formats = dict(layer_formats or {})
        super().__init__(bits=bits, group_size=group_size, **kwargs)
        if not isinstance(selection_tokens, int) or selection_tokens < 1:
            raise _err("selection_tokens", selection_tokens, "a positive int")
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
        if self.selection in ("output_error", "relative_output_error"):
            return f"selection={self.selection!r} measures layer outputs on calibration data"
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
                raise ValueError(f"MoFQ selection={self.selection!r} needs calibration inputs for layer {name}")
            errors = select.output_errors(weight, inputs[: self.selection_tokens], self.candidates,
                                          self.group_size_or_none(), self.scale_torch_dtype, self.act_format, name,
                                          relative=self.selection == "relative_output_error")
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
