"""Fake quantization with a straight-through estimator, and export to packed QuantLinear checkpoints.

:class:`FakeQuantLinear` is an ``nn.Linear`` whose forward uses ``Q(W)``: round-to-nearest in a catalog
format (:mod:`hf_efficient.formats`), scales (and zero points) recomputed from the live float weight
every forward as the BitDistiller paper does, rounded to the export's ``scale_dtype``. The backward is
the straight-through estimator: ``dL/dW = dL/dQ(W)`` (the rounding is treated as identity; the scales'
dependence on the group max/min is not differentiated).

Because ``Q`` is exactly the fit + encode + decode that :class:`~hf_efficient.quantization.QuantLinear`
round-to-nearest uses, :func:`convert` produces packed layers whose dequantized weights equal ``Q(W)``
bit for bit. Being a subclass of ``nn.Linear`` with the same parameter names keeps peft LoRA, AdamA,
``save_pretrained`` and Trainer checkpoints working unchanged (a checkpoint holds the latent float weights).
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..quantization.config import matches_module
from ..quantization.linear import SCALE_DTYPES, group_params, resolve_group_size
from ..quantization.packing import expand_groups
from .config import BitDistillerConfig

logger = logging.getLogger(__name__)


def fake_quantize_weight(w: torch.Tensor, fmt, group_size: int | None, scale_dtype=torch.float16) -> torch.Tensor:
    """``Q(w)`` for a weight ``w`` (N, K): round-to-nearest in ``fmt`` with per-group parameters fitted to ``w``.

    Returns a tensor of ``w``'s dtype with no gradient path (the STE is added by :func:`ste_quantize`).
    Equal, element for element, to ``QuantLinear.from_linear(...).dequantize(w.dtype)``.
    """
    fmt = formats.get_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"fake_quantize_weight needs a 2-D weight, got shape {tuple(w.shape)}")
    if isinstance(scale_dtype, str):
        scale_dtype = SCALE_DTYPES[scale_dtype]
    w = w.detach()
    n, k = w.shape
    gs = resolve_group_size(group_size, k)
    wf = w.float()
    params = group_params(fmt, wf, gs, scale_dtype)
    if k % gs == 0:  # groups as a view: no per-column copies of the parameters
        wf = wf.reshape(n, k // gs, gs)
        cols = {p: t[..., None] for p, t in params.items()}
    else:
        cols = {p: expand_groups(t, k, gs) for p, t in params.items()}
    if fmt.scale_scheme.offset:  # INT zero point: (scale, zero point) are the scheme's (a, b)
        return _zero_point_round_trip(fmt, wf, *fmt.scale_scheme.kernel_ab(cols)).reshape(n, k).to(w.dtype)
    return formats.decode(fmt, formats.encode(fmt, wf, cols), cols, w.dtype).reshape(n, k)


def _zero_point_round_trip(fmt, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``decode(encode(w))`` of an INT zero-point format in closed form (bit-identical, faster: docs/bitdistiller.md).

    ``formats.encode`` finds the nearest of the codes ``0..qmax`` by a search over the midpoints
    ``c + 0.5`` (ties to the lower code): that index is ``ceil(x - 0.5)`` clamped to the codes, and
    ``x - 0.5`` is exact in float32 for every ``x`` where the result can matter.
    """
    x = w / torch.where(s > 0, s, torch.ones_like(s)) + z
    c = torch.clamp(torch.ceil(x - 0.5), 0, 2 ** fmt.bits - 1)
    return (c - z) * s


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste_quantize(w: torch.Tensor, fmt, group_size: int | None, scale_dtype=torch.float16) -> torch.Tensor:
    """``Q(w)`` in the forward, identity in the backward (straight-through estimator)."""
    return _STE.apply(w, fake_quantize_weight(w, fmt, group_size, scale_dtype))


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` computing ``x @ Q(W)ᵀ + b`` with STE gradients into the float ``W``.

    ``quant_enabled = False`` (or the :func:`fake_quant_disabled` context) makes it a plain linear,
    which is how the same model serves as its own float teacher. Under ``torch.no_grad`` the quantized
    weight is cached until ``W`` changes (evaluation and teacher passes re-use it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, fmt="int2_asym",
                 group_size: int | None = 64, scale_dtype="float16", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.fmt = formats.get_format(fmt)
        self.group_size = resolve_group_size(group_size, in_features)
        self.scale_dtype = SCALE_DTYPES[scale_dtype] if isinstance(scale_dtype, str) else scale_dtype
        self.quant_enabled = True
        self._cache: tuple | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt, group_size, scale_dtype="float16") -> "FakeQuantLinear":
        """Wrap ``lin`` sharing its ``weight``/``bias`` Parameters (an optimizer built on them stays valid)."""
        with torch.device("meta"):
            q = cls(lin.in_features, lin.out_features, lin.bias is not None, fmt=fmt, group_size=group_size,
                    scale_dtype=scale_dtype, dtype=lin.weight.dtype)
        q.weight = lin.weight
        q.bias = lin.bias
        # Hooks others installed on the linear (accelerate's device hooks) must survive the swap.
        q._forward_hooks.update(lin._forward_hooks)
        q._forward_pre_hooks.update(lin._forward_pre_hooks)
        if hasattr(lin, "_hf_hook"):
            q._hf_hook = lin._hf_hook
        return q

    def quantized_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._cache = None
            return ste_quantize(self.weight, self.fmt, self.group_size, self.scale_dtype)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, fake_quantize_weight(self.weight, self.fmt, self.group_size, self.scale_dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt.name}, group_size={self.group_size}"


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _skip_patterns(model: nn.Module, config: BitDistillerConfig) -> list[str]:
    skip = list(config.modules_to_not_convert)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        skip.append("lm_head")  # the tied head is the embedding, which stays float
    return skip


def wrap_linears(model: nn.Module, config: BitDistillerConfig) -> list[str]:
    """Replace every ``nn.Linear`` not in ``config.modules_to_not_convert`` with a :class:`FakeQuantLinear`.

    Parameters are shared, not copied. Returns the names wrapped; a model already wrapped is left alone.
    """
    skip = _skip_patterns(model, config)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not matches_module(n, skip) and ".lora_" not in f".{n}"]
    for n in names:
        lin = model.get_submodule(n)
        model.set_submodule(n, FakeQuantLinear.from_linear(lin, config.weight_format, config.group_size,
                                                           config.scale_dtype))
    if not names and not fake_quant_layers(model):
        raise ValueError(f"no nn.Linear to fake-quantize in {type(model).__name__} "
                         f"(modules_to_not_convert={config.modules_to_not_convert})")
    return names


def prepare_qat(model: nn.Module, config: BitDistillerConfig, calibration: torch.Tensor | None = None,
                progress: bool = True) -> nn.Module:
    """Make ``model`` quantization-aware in place: asymmetric clipping init (when ``config.clip`` and
    ``calibration`` token windows ``(n, seqlen)`` are given), then fake quantization of its linears.

    Returns ``model``. Clipping clamps the float weights themselves (so the teacher must be a copy taken
    before this call, or the same model with fake quantization off, which then includes the clipping).
    """
    if config.clip and calibration is not None:
        from .clip import init_clipping

        init_clipping(model, config, calibration, progress=progress)
    elif config.clip:
        logger.warning("BitDistiller: clip=True but no calibration windows were given; skipping clipping init")
    wrap_linears(model, config)
    return model


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module):
    """Within this block every FakeQuantLinear of ``model`` is a plain float linear."""
    layers = list(fake_quant_layers(model).values())
    old = [m.quant_enabled for m in layers]
    for m in layers:
        m.quant_enabled = False
    try:
        yield model
    finally:
        for m, o in zip(layers, old):
            m.quant_enabled = o


def unwrap(model: nn.Module) -> nn.Module:
    """Replace each FakeQuantLinear by a plain ``nn.Linear`` holding the same (latent float) Parameters."""
    for n, m in fake_quant_layers(model).items():
        with torch.device("meta"):
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, dtype=m.weight.dtype)
        lin.weight, lin.bias = m.weight, m.bias
        model.set_submodule(n, lin)
    return model


@torch.no_grad()
def convert(model: nn.Module, config: BitDistillerConfig, progress: bool = False) -> nn.Module:
    """Turn a trained fake-quant model into packed QuantLinear layers of ``config.to_quant_config()``, in place.

    The packed weights decode to exactly the fake-quantized weights, so the model computes what it did in
    training (up to the kernel's summation order). ``model.save_pretrained(dir)`` then writes a checkpoint
    that ``AutoModelForCausalLM.from_pretrained(dir)`` reloads after ``import hf_efficient``. A peft model
    is merged first (``merge_and_unload``): the exported weight is ``Q(W + BA)``, not the ``Q(W) + BA``
    trained, so measure the exported model.
    """
    from ..quantization.api import quantize_model

    if hasattr(model, "merge_and_unload"):
        logger.warning("BitDistiller convert: merging LoRA adapters into the float weights before quantizing; "
                       "the exported model quantizes W + BA, which differs from the trained Q(W) + BA")
        model = model.merge_and_unload()
    if not fake_quant_layers(model):
        raise ValueError("convert needs a model prepared with prepare_qat (it has no FakeQuantLinear layers)")
    unwrap(model)
    return quantize_model(model, config.to_quant_config(), progress=progress)
