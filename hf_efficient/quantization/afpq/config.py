"""``AFPQConfig``: one numeric format for every converted layer; the AFPQ recipe is FP/NF with two scales."""
from __future__ import annotations

from ... import formats
from ..config import LayerSpec, QuantConfigBase, _err

FMT_KINDS = ("fp", "nf", "int")


class AFPQConfig(QuantConfigBase):
    """Asymmetric floating-point quantization (AFPQ) and its comparison formats, as a transformers config.

    Args:
        bits: 2, 3, 4 or 8 (which exist depends on ``fmt``: fp 3/4 (and 8 symmetric), nf 3/4, int 2/3/4/8).
        group_size: columns per scale group (default 128; -1 per-channel). Need not divide in_features.
        fmt: "fp" (FP4-E2M1 / FP3 / FP8-E4M3), "nf" (NF4 / NF3) or "int".
        asymmetric: True (default) = AFPQ's two scales (s_pos, s_neg) for fp/nf, a zero point for int;
            False = one absmax scale.
        Other fields: see :class:`~hf_efficient.quantization.config.QuantConfigBase`.

    Example: ``AFPQConfig(bits=4, group_size=128, fmt="fp")`` is AFPQ FP4-asym g128.
    """

    quant_method_name = "afpq"

    def __init__(self, bits: int = 4, group_size: int = 128, fmt: str = "fp", asymmetric: bool = True, **kwargs):
        self.fmt = fmt
        self.asymmetric = asymmetric
        super().__init__(bits=bits, group_size=group_size, **kwargs)
        if fmt not in FMT_KINDS:
            raise _err("fmt", fmt, f"one of {FMT_KINDS}")
        if not isinstance(asymmetric, bool):
            raise _err("asymmetric", asymmetric, "True or False")
        try:
            formats.format_name(fmt, bits, not asymmetric)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}(fmt={fmt!r}, bits={bits}, asymmetric={asymmetric}): {e}") from None

    @property
    def weight_format(self) -> str:
        return formats.format_name(self.fmt, self.bits, not self.asymmetric)

    def layer_spec(self, name: str) -> LayerSpec:
        return LayerSpec(self.weight_format, self.group_size_or_none())
