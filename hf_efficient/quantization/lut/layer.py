"""The LUT kernels as the CPU fast path of :class:`~hf_efficient.quantization.QuantLinear`.

The kernel is chosen by device and format, not by quantization method: every QuantLinear of 1..4 bits on the
CPU (LUT, AFPQ two-scale FP/NF, MoFQ W4 ...) runs on the LUT kernels by default. Its weights are permuted into
the kernel layout on its first CPU forward (``LUTConfig`` models, and :func:`enable_lut`, do it at once, which
``torch.compile`` needs: the permutation is not traced). ``enable_lut(model, enabled=False)`` opts a model out.
The permuted weights live beside the stored ones (``layer._lut``, never saved) and are rebuilt if the stored
tensors change.
The fast path declines (the plain-torch path runs) for non-CPU inputs, inputs needing gradients, group sizes
the kernels cannot tile, and prefill-sized inputs above :data:`MAX_LUT_ROWS` rows, where a dequantized
BLAS GEMM is faster than one LUT pass per row.

The float output head (``lm_head``, often tied to the embeddings and then never quantized by the configs) can
also run on the kernels: ``enable_lut(model, head_bits=4)`` keeps the float weight as it is (saved, tied,
trained) and adds a runtime-only quantized copy that no-grad forwards use, as llama.cpp does with its
quantized output matrix. At decode the head is the largest single matmul of a small model.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import formats
from ..linear import QuantLinear, register_fast_path
from . import kernel

MAX_LUT_ROWS = 32


def _key(layer: QuantLinear) -> tuple:
    ts = [layer.qweight] + [getattr(layer, p) for p in layer.fmt.param_names]
    return tuple((id(t), t._version) for t in ts)


def supported(layer: QuantLinear) -> bool:
    return (1 <= layer.fmt.bits <= 4 and layer.act_fmt is None
            and kernel.kernel_group_size(layer.group_size, layer.in_features) is not None)


def prepare_layer(layer: QuantLinear) -> kernel.LUTWeight | None:
    """Build (or reuse) the layer's kernel-layout weights; None if the kernels cannot run this layer."""
    if not supported(layer) or layer.qweight.device.type != "cpu":
        return None
    cached = getattr(layer, "_lut", None)
    if torch.compiler.is_compiling():
        # The staleness key (ids and tensor versions) cannot be traced; weights do not change inside a compiled
        # inference graph, so the copy enable_lut built is used as is (none built: decline).
        return cached[1] if cached is not None else None
    key = _key(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = kernel.prepare(layer.codes(), layer.fmt, layer.params(), layer.group_size)
    layer._lut = (key, w)
    return w


def enable_lut(model: nn.Module, enabled: bool = True, *, head_bits: int | None = None,
               head_group_size: int = 64) -> list[str]:
    """Run every supported QuantLinear of ``model`` on the CPU LUT kernels (permuting weights now).

    ``head_bits`` (2, 3 or 4): also give the float output head (``model.get_output_embeddings()``, an
    ``nn.Linear``) a runtime-only INT ``head_bits`` zero-point copy with ``head_group_size`` groups, used by
    no-grad forwards (:class:`LUTHead`); its float weight stays in place (ties, saving and training see it
    unchanged). Returns the names of the layers that will use the kernels. ``enabled=False`` switches back
    to the default paths and frees the permuted and quantized copies.
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
            m.__dict__.pop("_lut", None)
        elif prepare_layer(m) is not None:
            names.append(name)
    if enabled and head_bits is not None:
        names.append(_enable_head(model, head_bits, head_group_size))
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

    def quantized(self) -> QuantLinear:
        cached = self.__dict__.get("_lut_head")
        if torch.compiler.is_compiling():  # the staleness key cannot be traced; weights are fixed there
            return cached[1]
        key = (id(self.weight), self.weight._version, self.weight.device)
        if cached is None or cached[0] != key:
            bits, group_size = self._spec
            with torch.no_grad():
                q = QuantLinear.from_linear(self, formats.format_name("int", bits, False), group_size,
                                            name="lm_head (enable_lut head copy)")
            q._lut_enabled = True
            prepare_layer(q)
            cached = self.__dict__["_lut_head"] = (key, q)
        return cached[1]

    def release(self) -> None:
        """Back to a plain ``nn.Linear`` (the quantized copy is dropped)."""
        self.__dict__.pop("_lut_head", None)
        self.__dict__.pop("_spec", None)
        self.__class__ = nn.Linear


def _enable_head(model: nn.Module, bits: int, group_size: int) -> str:
    if bits not in (2, 3, 4):
        raise ValueError(f"enable_lut: head_bits must be 2, 3 or 4, got {bits}")
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


def lut_fast_path(x: torch.Tensor, layer: QuantLinear):
    if not getattr(layer, "_lut_enabled", True) or x.device.type != "cpu" or not kernel.available():
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None
    if x.numel() // max(x.shape[-1], 1) > MAX_LUT_ROWS:
        return None
    w = prepare_layer(layer)
    if w is None:
        return None
    y = w.matmul(x)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


def register() -> None:
    for bits in (2, 3, 4):
        register_fast_path("*", bits, "cpu", lut_fast_path, name="lut")
