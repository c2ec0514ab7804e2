"""``BitDistillerConfig``: what BitDistiller quantization-aware training does, validated once.

The weight format is named like :class:`~hf_efficient.quantization.afpq.AFPQConfig` (``fmt`` + ``bits`` +
``asymmetric``) so that the trained model exports to exactly that packed format (:func:`to_quant_config`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .. import formats

LOSSES = ("cakld", "fkl", "rkl", "ce")
FMT_KINDS = ("int", "nf", "fp")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
FORMAT_VERSION = 1


def _err(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"BitDistillerConfig.{name}={value!r} is not valid: {allowed}")


@dataclass
class BitDistillerConfig:
    """Settings of one BitDistiller run (fake-quant format, clipping init, loss).

    Example: ``BitDistillerConfig(bits=2, group_size=64, fmt="int")`` is the paper's W2 g64 INT2-asym
    recipe; ``BitDistillerConfig(bits=3, group_size=128, fmt="nf")`` is AFPQ NF3-asym (the paper's "n2f3").
    """

    bits: int = field(default=2, metadata={"help": "weight bit width (int: 2/3/4/8, nf: 3/4, fp: 3/4)"})
    group_size: int = field(default=64, metadata={"help": "columns per scale group along in_features; -1 "
                                                          "per output channel; need not divide in_features"})
    fmt: str = field(default="int", metadata={"help": "number format: 'int', 'nf' or 'fp'"})
    asymmetric: bool = field(default=True, metadata={"help": "int: zero point; nf/fp: AFPQ two scales. False = "
                                                             "one absmax scale"})
    scale_dtype: str = field(default="float16", metadata={"help": "dtype scales are stored in after export; the "
                                                                  "fake quantizer rounds scales to it so that "
                                                                  "export is exact"})
    modules_to_not_convert: list = field(default_factory=lambda: ["lm_head"],
                                         metadata={"help": "linear modules kept in float (names or regexes, "
                                                           "as in AFPQConfig); embeddings always stay float"})
    clip: bool = field(default=True, metadata={"help": "asymmetric clipping init before training"})
    clip_grid: int = field(default=10, metadata={"help": "steps per axis of the (max, min) shrink search"})
    clip_min_ratio: float = field(default=0.55, metadata={"help": "smallest shrink ratio of the group max/min"})
    clip_samples: int = field(default=16, metadata={"help": "calibration sequences for the clipping search"})
    clip_seqlen: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    loss: str = field(default="cakld", metadata={"help": "'cakld' (confidence-aware blend), 'fkl' "
                                                         "KL(teacher||student), 'rkl' KL(student||teacher) or "
                                                         "'ce' (cross-entropy on the labels, no teacher)"})
    beta: float | None = field(default=None, metadata={"help": "CAKLD weight of the reverse KL; None = the "
                                                               "teacher's mean top-1 probability, estimated once"})
    beta_batches: int = field(default=4, metadata={"help": "training batches used to estimate beta"})
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.format_version != FORMAT_VERSION:
            raise _err("format_version", self.format_version, f"this hf-efficient reads version {FORMAT_VERSION}")
        if self.fmt not in FMT_KINDS:
            raise _err("fmt", self.fmt, f"one of {FMT_KINDS}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise _err("bits", self.bits, "an int")
        if not isinstance(self.asymmetric, bool):
            raise _err("asymmetric", self.asymmetric, "True or False")
        try:
            formats.format_name(self.fmt, self.bits, not self.asymmetric)
        except ValueError as e:
            raise _err("bits", self.bits, str(e)) from None
        if not (isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size >= 1)):
            raise _err("group_size", self.group_size, "a positive int or -1 (per output channel)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise _err("scale_dtype", self.scale_dtype, f"one of {SCALE_DTYPES}")
        if self.loss not in LOSSES:
            raise _err("loss", self.loss, f"one of {LOSSES}")
        if self.beta is not None and not (isinstance(self.beta, (int, float)) and 0.0 <= self.beta <= 1.0):
            raise _err("beta", self.beta, "None (estimate from the teacher) or a number in [0, 1]")
        for name in ("clip_grid", "clip_samples", "clip_seqlen", "beta_batches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _err(name, v, "a positive int")
        if not (isinstance(self.clip_min_ratio, (int, float)) and 0.0 < self.clip_min_ratio <= 1.0):
            raise _err("clip_min_ratio", self.clip_min_ratio, "a number in (0, 1]")
        if not isinstance(self.modules_to_not_convert, (list, tuple)):
            raise _err("modules_to_not_convert", self.modules_to_not_convert, "a list of module names/patterns")
        self.modules_to_not_convert = list(self.modules_to_not_convert)

    @property
    def weight_format(self) -> str:
        """Catalog name of the weight format (``"int2_asym"``, ``"nf3_asym"``, ...)."""
        return formats.format_name(self.fmt, self.bits, not self.asymmetric)

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "ce"

    def clip_ratios(self) -> list[float]:
        """Shrink ratios tried on each axis: 1.0 down to ``clip_min_ratio`` in ``clip_grid`` steps."""
        if self.clip_grid == 1:
            return [1.0]
        step = (1.0 - self.clip_min_ratio) / (self.clip_grid - 1)
        return [1.0 - i * step for i in range(self.clip_grid)]

    def to_quant_config(self):
        """The :class:`~hf_efficient.quantization.afpq.AFPQConfig` the trained model exports to (RTN)."""
        from ..quantization.afpq import AFPQConfig

        return AFPQConfig(bits=self.bits, group_size=self.group_size, fmt=self.fmt, asymmetric=self.asymmetric,
                          scale_dtype=self.scale_dtype, modules_to_not_convert=list(self.modules_to_not_convert),
                          algorithm="rtn")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BitDistillerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BitDistillerConfig got unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
