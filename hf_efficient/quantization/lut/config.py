"""``LUTConfig``: weight-only low-bit quantization whose CPU matmuls run on the T-MAC-style LUT kernels."""
from __future__ import annotations

from ..afpq.config import AFPQConfig
from ..config import _err


class LUTConfig(AFPQConfig):
    """Quantize linears to 2/3/4-bit codes and run them on the CPU with LUT kernels (no dequantization).

    Args:
        bits: 2, 3 or 4 (which exist depends on ``fmt``: int 2/3/4, fp 3/4, nf 3/4).
        group_size: columns per scale group (default 128; -1 per-channel). Need not divide in_features. The
            kernels need a multiple of 16 (32/64/128 ...); other sizes keep the plain-torch path.
        fmt: "int" (bit-serial T-MAC tables), "fp" (FP4-E2M1 / FP3) or "nf" (NF4 / NF3) (code-indexed tables).
        asymmetric: True (default) = an integer zero point for int, AFPQ's two scales (s_pos, s_neg) for
            fp/nf; False = one absmax scale.
        Other fields: see :class:`~hf_efficient.quantization.config.QuantConfigBase` (``algorithm="gptq"``
        quantizes with calibration through ``hf_efficient.quantization.quantize``).

    The same format choices as :class:`AFPQConfig` (it subclasses it, defaulting to INT); only the method
    name and the kernel path differ. Storage is the shared QuantLinear layout (``qweight``/``scales``/...):
    the kernel layout is built from it once when the model is loaded, so a LUT checkpoint is also a valid
    AFPQ-layout checkpoint and vice versa.
    Example: ``LUTConfig(bits=2, group_size=64)`` is INT2 (zero point) g64.
    """

    quant_method_name = "lut"

    def __init__(self, bits: int = 4, group_size: int = 128, fmt: str = "int", asymmetric: bool = True, **kwargs):
        if bits not in (2, 3, 4):
            raise _err("bits", bits, "2, 3 or 4 (the LUT kernels take 1..4-bit codes; the formats catalog has 2..4)")
        super().__init__(bits=bits, group_size=group_size, fmt=fmt, asymmetric=asymmetric, **kwargs)

    def after_load(self, model) -> None:
        from .layer import enable_lut

        enable_lut(model, fast_decode=False)  # the quantizer switches the decoder layers for every config
