"""The shared base of our quantization configs (transformers ``QuantizationConfigMixin`` subclasses).

A config answers one question for the generic quantizer: :meth:`QuantConfigBase.layer_spec` — which weight
format, group size and (optional) activation format a given linear layer gets. Everything else
(module replacement, quantize-on-load, save/reload, LoRA) is shared by every method.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import formats
from .linear import SCALE_DTYPES
from .packing import FORMAT_VERSION, READABLE_FORMAT_VERSIONS

ALGORITHMS = ("rtn", "gptq")
DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class LayerSpec:
    fmt: str
    group_size: int | None
    act_fmt: str | None = None


def _err(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"{field}={value!r} is not valid: {allowed}")


def matches_module(name: str, patterns) -> bool:
    """True if ``name`` (dotted) contains one of ``patterns`` as whole dotted segments, or fully matches it
    as a regular expression (``lm_head`` matches ``lm_head`` and ``model.lm_head``; ``mlp`` matches
    ``model.layers.0.mlp.up_proj``; ``layers\\.0\\..*`` matches layer 0)."""
    padded = f".{name}."
    for p in patterns or ():
        if f".{p}." in padded:
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


class QuantConfigBase(QuantizationConfigMixin):
    """Fields every method shares. Subclasses set ``quant_method`` and implement :meth:`layer_spec`.

    Args:
        bits: weight bit width.
        group_size: columns per scale group along in_features (-1: per output channel). It need not divide
            in_features: the last group of a row is shorter.
        scale_dtype: storage dtype of scales: "float16" (default), "bfloat16" or "float32".
        modules_to_not_convert: module names/patterns kept in float (default ``["lm_head"]``).
        algorithm: "rtn" (round-to-nearest, works on load) or "gptq" (calibrated; run
            :func:`hf_efficient.quantization.quantize` or ``hf-efficient quantize``, which write a checkpoint).
        act_order, damp, calib_samples, calib_seqlen: GPTQ settings (column order by Hessian diagonal,
            dampening as a fraction of the mean diagonal, calibration windows and their length; the default
            16 x 256 tokens keeps GPTQ on a 135M model to about a minute on two CPU cores).
        calib_source: where calibration text comes from: "mixed" (default: half training plays, half text
            the model writes itself from short prompts), "plays", "generated", a text file, a folder of
            ``*.txt`` files, or "dataset:NAME[:SPLIT[:COLUMN]]" (a ``datasets`` dataset in the local cache).
        format_version: storage layout version; loading refuses versions it does not know.
    """

    quant_method_name = ""
    # Read by the generic quantizer (hf_efficient.integrations.transformers): every layer's kernel layout is
    # built once at load (CUDA and CPU), outside any trace, so generate may compile the model (static cache).
    compileable = True

    def __init__(self, bits: int = 4, group_size: int = 128, scale_dtype: str = "float16",
                 modules_to_not_convert: list[str] | None = None, algorithm: str = "rtn", act_order: bool = False,
                 damp: float = 0.01, calib_samples: int = 16, calib_seqlen: int = 256, calib_source: str = "mixed",
                 format_version: int = FORMAT_VERSION, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = self.quant_method_name
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = list(DEFAULT_SKIP) if modules_to_not_convert is None \
            else list(modules_to_not_convert)
        self.algorithm = algorithm
        self.act_order = act_order
        self.damp = damp
        self.calib_samples = calib_samples
        self.calib_seqlen = calib_seqlen
        self.calib_source = calib_source
        self.format_version = format_version
        unknown = sorted(k for k in kwargs if not k.startswith("_"))
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown fields {unknown}")
        self._validate_common()

    def _validate_common(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise _err("format_version", self.format_version,
                       f"this hf-efficient reads checkpoint format_version {READABLE_FORMAT_VERSIONS}; upgrade "
                       f"hf-efficient or re-quantize the model")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise _err("bits", self.bits, "an int")
        if not (isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 1)):
            raise _err("group_size", self.group_size, "a positive int or -1 (per-channel)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise _err("scale_dtype", self.scale_dtype, f"one of {sorted(SCALE_DTYPES)}")
        if self.algorithm not in ALGORITHMS:
            raise _err("algorithm", self.algorithm, f"one of {ALGORITHMS}")
        if not 0 <= float(self.damp) < 1:
            raise _err("damp", self.damp, "a fraction in [0, 1)")
        for f in ("calib_samples", "calib_seqlen"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise _err(f, v, "a positive int")
        if not isinstance(self.calib_source, str) or not self.calib_source:
            raise _err("calib_source", self.calib_source, "'mixed', 'plays', 'generated', a path or 'dataset:NAME'")
        if not isinstance(self.modules_to_not_convert, list):
            raise _err("modules_to_not_convert", self.modules_to_not_convert, "a list of module names/patterns")

    # --- what the generic quantizer asks -----------------------------------------------------------
    def layer_spec(self, name: str) -> LayerSpec:
        """Format, group size and activation format of the linear layer ``name``."""
        raise NotImplementedError

    def needs_calibration(self) -> str | None:
        """Why this config cannot quantize on load (None if it can)."""
        if self.algorithm == "gptq":
            return "algorithm='gptq' needs calibration data"
        return None

    def choose_format(self, name: str, weight, inputs=None) -> str:
        """The format of layer ``name`` given its float ``weight`` (and calibration ``inputs``, (tokens, in),
        when a calibrated run has them). Methods that choose per layer (MoFQ) override this."""
        return self.layer_spec(name).fmt

    def record_choice(self, name: str, fmt: str) -> None:
        """Called after :meth:`choose_format` so the choice is saved with the checkpoint. Default: nothing."""

    def summary(self) -> str:
        return ""

    @property
    def scale_torch_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}

    def group_size_or_none(self) -> int | None:
        return None if self.group_size == -1 else self.group_size


def check_format(name: str) -> str:
    return formats.get_format(name).name
