"""The LUT kernels as the CPU fast path of :class:`~hf_efficient.quantization.QuantLinear`.

The kernel is chosen by device and format, not by quantization method: every QuantLinear of 1..4 bits on the
CPU (LUT, AFPQ two-scale FP/NF, MoFQ W4 ...) runs on the LUT kernels by default. A layer converts its weights
once into the kernel's stream and adopts it as its **resident layout** (:meth:`QuantLinear.adopt_layout`,
kind ``"cpu-lut"``): the stream is the layer's only copy of its codes, the stored ``qweight`` is freed, and
``state_dict()`` / ``codes()`` / ``dequantize()`` rebuild the checkpoint tensors from the stream
(``lut_codes``, the inverse of the packing). The per-group parameters (1-2 % of the bytes) are kept as
they are, so the round trip is exact. Conversion happens on a layer's first CPU forward, or at once through
:func:`enable_lut` (``LUTConfig`` models call it when loaded); call it before ``torch.compile``, which cannot
trace the conversion. ``enable_lut(model, enabled=False)`` goes back to the stored layout and the reference path.

Inputs of up to ``kernel.max_lut_rows()`` rows (decode) run the table kernels; larger ones (prefill) the same
op's blocked dequantize + BLAS GEMM. Inputs that need gradients get ``F.linear`` on the dequantized stream,
which equals the reference path bit for bit and is differentiable. Group sizes the kernels cannot tile keep
the reference path.

The float output head (``lm_head``, often tied to the embeddings and then never quantized by the configs) can
also run on the kernels: ``enable_lut(model, head_bits=4)`` keeps the float weight as it is (saved, tied,
trained) and adds a runtime-only quantized copy that no-grad forwards use, as llama.cpp does with its
quantized output matrix. At decode the head is the largest single matmul of a small model. ``head_bits=8`` is an
INT8 copy (llama.cpp's Q8_0 head has that precision) run on the 4-bit kernels as its two nibbles
(:class:`NibbleHead`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...heap import release_free_heap

from ... import formats
from ...kernels import lut_cpu as kernel
from ..linear import QuantLinear, ResidentLayout, register_fast_path, rtn_quantize
from ..packing import pack_codes

KIND = "cpu-lut"
MAX_LUT_ROWS = 32  # the C++ default of kernel.max_lut_rows(): decode-sized inputs run the table kernels


def supported(layer: QuantLinear) -> bool:
    return (1 <= layer.fmt.bits <= 4 and layer.act_fmt is None
            and kernel.kernel_group_size(layer.group_size, layer.in_features) is not None)


def _weight(layer: QuantLinear) -> kernel.LUTWeight:
    """The adopted stream as a LUTWeight (a view of the layer's buffers, nothing copied)."""
    bits, group_size, coded = layer.layout.meta
    grid = layer.layout_tensor("grid") if coded else None
    return kernel.LUTWeight(layer.layout_tensor("stream"), grid, bits, group_size, layer.in_features,
                            layer.out_features)


def _to_storage(layer: QuantLinear) -> dict:
    """Checkpoint tensors from the stream: the codes by the inverse of the packing, the params as kept."""
    stream = layer.layout_tensor("stream")
    w = _weight(layer)
    if stream.device.type != "cpu":  # the unpacking op runs on the CPU
        w.qweight, w.grid = stream.cpu(), None if w.grid is None else w.grid.cpu()
    out = {"qweight": pack_codes(w.codes(), layer.fmt.bits).to(stream.device)}
    out.update({p: layer.layout_tensor(p) for p in layer.fmt.param_names})
    return out


def prepare_layer(layer: QuantLinear) -> kernel.LUTWeight | None:
    """The layer's weights in the kernel layout, converting it (adopting the layout) the first time; None if
    the kernels cannot run this layer."""
    lay = layer.layout
    if lay is not None and lay.kind == KIND:
        return _weight(layer)
    if torch.compiler.is_compiling() or not supported(layer):
        return None  # the conversion is not traceable: enable_lut before torch.compile
    st = layer.storage()
    if st["qweight"].device.type != "cpu":
        return None
    params = {p: st[p] for p in layer.fmt.param_names}
    w = kernel.prepare(layer.codes(), layer.fmt, params, layer.group_size)
    tensors = {"stream": w.qweight, **({"grid": w.grid} if w.grid is not None else {}),
               **{p: t.clone() for p, t in params.items()}}
    layer.adopt_layout(ResidentLayout(KIND, tensors, _to_storage, meta=(w.bits, w.group_size, w.grid is not None)))
    # the conversion's int64 temporaries: trimmed per layer, or converting the 210 linears of SmolLM2-135M grew
    # the process by 2-3 GiB of free heap in some runs (hf_efficient.heap)
    release_free_heap()
    return _weight(layer)


def enable_lut(model: nn.Module, enabled: bool = True, *, head_bits: int | None = None,
               head_group_size: int = 64, fast_decode: bool = True) -> list[str]:
    """Run every supported QuantLinear of ``model`` on the CPU LUT kernels (permuting weights now).

    ``head_bits`` (2, 3, 4 or 8): also give the float output head (``model.get_output_embeddings()``, an
    ``nn.Linear``) a runtime-only INT ``head_bits`` zero-point copy with ``head_group_size`` groups, used by
    no-grad forwards (:class:`LUTHead`); its float weight stays in place (ties, saving and training see it
    unchanged). 8 bits cost about twice the 4-bit head's time and bytes (:class:`NibbleHead`) and keep nearly
    all of the float head's quality (docs/lut.md). Returns the names of the layers that will use the kernels.
    ``enabled=False`` switches back to the stored layout and the reference path (and frees the head's quantized
    copy).

    ``fast_decode``: also switch the model's Llama-style decoder layers to the fused one-token decode step
    (:func:`~hf_efficient.quantization.lut.decode.enable_fast_decode`; other architectures are left as they are);
    with ``enabled=False`` the layers are switched back.
    """
    if enabled and not kernel.available():
        raise RuntimeError("enable_lut: the hf_efficient C++ extension is not built")
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LUTHead) and not enabled:
            m.release()
        if not isinstance(m, QuantLinear):
            continue
        m._lut_enabled = enabled
        if not enabled:
            if m.layout is not None and m.layout.kind == KIND:
                m.release_layout()
        elif prepare_layer(m) is not None:
            names.append(name)
    if enabled and head_bits is not None:
        names.append(_enable_head(model, head_bits, head_group_size))
    if fast_decode:
        from .decode import enable_fast_decode

        enable_fast_decode(model, enabled)
    return names


class LUTHead(nn.Linear):
    """An ``nn.Linear`` output head whose no-grad forwards run a quantized copy of its weight.

    Made by ``enable_lut(model, head_bits=...)``, which switches the head's class in place so that its
    parameters (and a tie to the input embeddings) stay the very same tensors and the state dict is unchanged.
    The copy is rebuilt when the float weight changes; forwards that need gradients use the float weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        return self.quantized()(x)

    def quantized(self) -> QuantLinear | NibbleHead:
        cached = self.__dict__.get("_lut_head")
        if torch.compiler.is_compiling():  # the staleness key cannot be traced; weights are fixed there
            return cached[1]
        key = (id(self.weight), self.weight._version, self.weight.device)
        if cached is None or cached[0] != key:
            bits, group_size = self._spec
            with torch.no_grad():
                q = (NibbleHead.from_linear(self, group_size) if bits == 8 else
                     _lut_copy(QuantLinear.from_linear(self, formats.format_name("int", bits, False), group_size,
                                                       name=_HEAD_NAME)))
            cached = self.__dict__["_lut_head"] = (key, q)
        return cached[1]

    def release(self) -> None:
        """Back to a plain ``nn.Linear`` (the quantized copy is dropped)."""
        self.__dict__.pop("_lut_head", None)
        self.__dict__.pop("_spec", None)
        self.__class__ = nn.Linear


_HEAD_NAME = "lm_head (enable_lut head copy)"


def _lut_copy(q: QuantLinear) -> QuantLinear:
    q._lut_enabled = True
    prepare_layer(q)
    return q


class NibbleHead(nn.Module):
    """An INT8 zero-point copy of a head (``group_size`` groups, round to nearest) run on the 4-bit LUT kernels,
    which take codes of up to 4 bits: a code c = 16 hi + lo with zero z = 16 zh + zl dequantizes to
    s (c - z) = 16 s (hi - zh) + s (lo - zl). ``q`` holds both halves as one INT4 zero-point layer of twice the
    rows, the high nibbles (scale 16 s) above the low ones (scale s), so a step builds the input's tables once
    for both; the output adds the two halves. The dequantized weight equals the INT8 one up to float32
    rounding of that sum."""

    def __init__(self, q: QuantLinear, out_features: int):
        super().__init__()
        self.q, self.out_features = q, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "NibbleHead":
        n, k = linear.out_features, linear.in_features
        fmt = formats.format_name("int", 8, False)
        codes, p = rtn_quantize(linear.weight, formats.get_format(fmt), group_size, torch.float16, _HEAD_NAME)
        s, z = p["scales"], p["zeros"]  # the scales are fitted as float16 values already
        if float(s.abs().max()) * 16 > torch.finfo(torch.float16).max:
            raise ValueError(f"enable_lut(head_bits=8): the head's weights are too large for the high nibbles' "
                             f"float16 scales (16 x {float(s.abs().max()):.4g}); use head_bits=4")
        q = QuantLinear(k, 2 * n, formats.format_name("int", 4, False), group_size, linear.bias is not None,
                        torch.float16, device=linear.weight.device, dtype=linear.weight.dtype)
        q.load_quantized(torch.cat((codes >> 4, codes & 15)),
                         {"scales": torch.cat((16 * s, s)), "zeros": torch.cat((z.div(16, rounding_mode="floor"),
                                                                                z.remainder(16)))})
        if linear.bias is not None:  # added once: to the high half
            q.bias.data.copy_(torch.cat((linear.bias.detach(), torch.zeros_like(linear.bias))))
        return cls(_lut_copy(q), n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.q(x)
        return y[..., : self.out_features] + y[..., self.out_features:]

    def dequantize(self) -> torch.Tensor:
        w = self.q.dequantize()
        return w[: self.out_features] + w[self.out_features:]


def _enable_head(model: nn.Module, bits: int, group_size: int) -> str:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"enable_lut: head_bits must be 2, 3, 4 or 8, got {bits}")
    if kernel.kernel_group_size(group_size, 1 << 30) is None:
        raise ValueError(f"enable_lut: head_group_size must be a positive multiple of 16, got {group_size}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(head) not in (nn.Linear, LUTHead):
        raise ValueError(f"enable_lut(head_bits=...): the model's output head must be a plain nn.Linear, got "
                         f"{type(head).__name__} (quantized heads already run their own kernels)")
    if head.weight.device.type != "cpu":
        raise ValueError(f"enable_lut(head_bits=...): the head is on {head.weight.device}; the LUT kernels run on CPU")
    head.__class__ = LUTHead
    head.__dict__.pop("_lut_head", None)
    head._spec = (bits, group_size)
    head.quantized()  # quantize now, not in the first generate step
    return next(n for n, m in model.named_modules() if m is head)


def _cached_weight(layer: QuantLinear) -> kernel.LUTWeight | None:
    """:func:`prepare_layer`, remembered on the adopted layout object: decode calls this ~200 times per token.

    The cache lives and dies with the layout (released layout, cache gone) and is checked against the stream
    buffer itself, which ``.to()`` replaces. Not written while compiling (dynamo traces the plain lookup).
    """
    lay = layer.layout
    if lay is not None and lay.kind == KIND:
        cached = lay.__dict__.get("_lut_weight")
        if cached is not None and cached.qweight is layer._buffers.get("_rl_stream"):
            return cached
    if not kernel.available():
        return None
    w = prepare_layer(layer)
    if w is not None and not torch.compiler.is_compiling():
        layer.layout.__dict__["_lut_weight"] = w
    return w


def lut_layers(model: nn.Module):
    """Every QuantLinear of ``model`` in the kernels' layout, the runtime copies of :class:`LUTHead` included."""
    for m in model.modules():
        cached = m.__dict__.get("_lut_head") if isinstance(m, LUTHead) else None
        for q in (m,) if cached is None else (m, *cached[1].modules()):
            if isinstance(q, QuantLinear) and q.layout is not None and q.layout.kind == KIND:
                yield q


def place_stream(layer: QuantLinear) -> None:
    """Move the layer's stream to the kernels' storage if it starts anywhere else (a deep copy or ``.to()`` puts
    it at any offset; where it starts changes how fast a step reads it: docs/lut.md, round 12). Same values."""
    stream = layer.layout_tensor("stream")
    if stream.device.type == "cpu" and not kernel.placed(stream):
        layer.replace_layout_tensor("stream", kernel.stream_copy(stream))
        layer.layout.__dict__.pop("_lut_weight", None)  # it holds the old stream


def lut_fast_path(x: torch.Tensor, layer: QuantLinear):
    # The hot path of every decode step: each attribute lookup here costs on the order of a microsecond, and
    # the op itself ~20 us for a 576x576 layer, so Python work is kept to the checks that can decline.
    if not x.is_cpu or not layer.__dict__.get("_lut_enabled", True):
        return None
    w = _cached_weight(layer)
    if w is None:
        return None
    bias = layer.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Training (e.g. LoRA on a frozen quantized base): the exact weights, differentiable in x.
        return F.linear(x, w.dequantize().to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    y = w.matmul(x)
    if bias is not None:
        y = y + bias.float()
    return y if y.dtype == x.dtype else y.to(x.dtype)


def register() -> None:
    for bits in (2, 3, 4):
        register_fast_path("*", bits, "cpu", lut_fast_path, name="lut")
