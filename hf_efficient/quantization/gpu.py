"""CUDA fast path of :class:`~hf_efficient.quantization.linear.QuantLinear`: Triton kernels as torch ops.

``torch.ops.hf_efficient.quant_matmul`` (a ``torch.library`` custom op with a fake implementation, so
``torch.compile`` traces it without a graph break) multiplies activations by a weight in the kernel
layout of :mod:`hf_efficient.kernels.quant_layout`, choosing the kernel by shape (:func:`choose_kernel`):

* ``M <= 8``            dequant-fused GEMV on CUDA cores (split-K, one launch)
* ``M > 8``             dequant-fused GEMM on tensor cores (split-K for small M)
* ``"lut"``             the bit-serial LUT GEMM, where :data:`LUT_WINS` says it measured faster
                        (benchmarks/quant_gemv.py), or when forced with :func:`force_kernel`.

Importing this module registers the fast path for every format on CUDA. A layer is repacked into the
kernel layout once, on its first CUDA forward (or eagerly with :func:`prepare_model`, which
``torch.compile`` users should call first: a layer that is still unpacked while compiling falls back to
the reference path). The repacked tensors are non-persistent buffers (they follow ``.to()`` and are
never saved).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from .linear import QuantLinear, register_fast_path

logger = logging.getLogger(__name__)

KERNELS = ("auto", "gemv", "gemm", "lut")
GEMV_MAX_M = 8  # = kernels.quant_gemm.GEMV_MAX_M (not imported here: importing the kernels needs triton)
# (bits, max M) pairs where the LUT kernel beat the dequant kernels on the H100 benchmark; see
# docs/gpu_kernels.md. Empty: it never did, so "auto" never picks it.
LUT_WINS: set[tuple[int, int]] = set()
_forced: list[str] = []


@contextlib.contextmanager
def force_kernel(name: str):
    """Within this block ``quant_matmul`` uses kernel ``name`` (one of :data:`KERNELS`)."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def choose_kernel(m: int, bits: int, requested: str = "auto") -> str:
    """Kernel for an ``(m, K) x (K, N)`` product with ``bits``-bit weights."""
    req = _forced[-1] if _forced else requested
    if req != "auto":
        return req
    if any(bits == b and m <= mm for b, mm in LUT_WINS):
        return "lut"
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def _kernel_weight(qweight, params, table, lut_masks, lut_betas, n, k, bits, group_size, mode, decode, v_off):
    from ..kernels.quant_layout import KernelWeight

    return KernelWeight(qweight, params, table, n, k, bits, group_size, mode, decode, v_off,
                        lut_masks if lut_masks.numel() else None, lut_betas if lut_betas.numel() else None)


@torch.library.custom_op("hf_efficient::quant_matmul", mutates_args=())
def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, table: torch.Tensor,
                 lut_masks: torch.Tensor, lut_betas: torch.Tensor, n: int, k: int, bits: int, group_size: int,
                 mode: int, decode: int, v_off: float, kernel: str) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 and W in kernel layout -> (M, N) in x's dtype.

    On CUDA (or under ``TRITON_INTERPRET=1``) a Triton kernel chosen by :func:`choose_kernel`; elsewhere
    the plain-torch reference.
    """
    kw = _kernel_weight(qweight, params, table, lut_masks, lut_betas, n, k, bits, group_size, mode, decode, v_off)
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from ..kernels.quant_reference import quant_matmul_reference

        return quant_matmul_reference(x, kw)
    which = choose_kernel(x.shape[0], bits, kernel)
    if which == "gemv" and x.shape[0] > GEMV_MAX_M:
        which = "gemm"
    if which == "lut":
        from ..kernels.quant_lut import quant_lut_gemm

        return quant_lut_gemm(x, kw)
    from ..kernels.quant_gemm import quant_gemm, quant_gemv

    return quant_gemv(x, kw) if which == "gemv" else quant_gemm(x, kw)


@quant_matmul.register_fake
def _quant_matmul_fake(x, qweight, params, table, lut_masks, lut_betas, n, k, bits, group_size, mode, decode,
                       v_off, kernel):
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"quant_matmul: x must be (M, {k})")
    return x.new_empty(x.shape[0], n)


# ------------------------------------------------------------------------------------------------
# QuantLinear -> kernel layout, once
# ------------------------------------------------------------------------------------------------
_BUF = "_hfe_kernel_"
_TENSORS = ("qweight", "params", "table", "lut_masks", "lut_betas")


def supports(layer: QuantLinear) -> str | None:
    """None if the GPU kernels can run ``layer``; otherwise the reason they cannot."""
    if layer.fmt.bits not in (2, 3, 4, 8):
        return f"bits={layer.fmt.bits}"
    if layer.group_size % 32:
        return f"group_size={layer.group_size} is not a multiple of 32"
    if layer.act_fmt is not None:
        return "activation quantization"
    return None


def repack_layer(layer: QuantLinear) -> None:
    """Repack ``layer``'s stored weight into the kernel layout (non-persistent buffers on its device)."""
    from ..kernels.quant_layout import SCHEME_MODE, repack
    from ..kernels.quant_lut import MAX_LUT_BITS, prepare_lut

    reason = supports(layer)
    if reason:
        raise ValueError(f"the GPU kernels cannot run {layer.extra_repr()}: {reason}")
    fmt = layer.fmt
    names = fmt.param_names
    a = getattr(layer, names[0])
    b = getattr(layer, names[1]).to(a.dtype) if len(names) > 1 else None
    kw = repack(layer.codes(), a, b, fmt.grid, fmt.bits, layer.group_size, SCHEME_MODE[fmt.scheme])
    if fmt.bits <= MAX_LUT_BITS:
        prepare_lut(kw)
    empty = torch.empty(0, device=a.device)
    for name in _TENSORS:
        t = getattr(kw, name)
        layer.register_buffer(_BUF + name, empty if t is None else t, persistent=False)
    layer._hfe_kernel_meta = (kw.bits, kw.group_size, kw.mode, kw.decode, kw.v_off)
    layer._hfe_kernel_src = (layer.qweight.data_ptr(), layer.qweight._version)


def prepare_model(model: nn.Module) -> int:
    """Repack every supported QuantLinear of ``model`` that sits on CUDA; returns how many."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.qweight.is_cuda and supports(mod) is None:
            repack_layer(mod)
            count += 1
    return count


def _fresh(layer: QuantLinear) -> bool:
    if not hasattr(layer, "_hfe_kernel_meta"):
        return False
    if torch.compiler.is_compiling():
        return True  # buffers are graph inputs; staleness is checked in eager mode
    return layer._hfe_kernel_src == (layer.qweight.data_ptr(), layer.qweight._version)


def quant_linear_forward(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor | None:
    """The fast path registered for QuantLinear on CUDA (declines by returning None)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or supports(layer) is not None:
        return None
    if not _fresh(layer):
        if torch.compiler.is_compiling():
            logger.warning("QuantLinear not repacked before torch.compile: call "
                           "hf_efficient.quantization.gpu.prepare_model(model) first; using the reference path")
            return None
        repack_layer(layer)
    bits, group, mode, decode, v_off = layer._hfe_kernel_meta
    t = [getattr(layer, _BUF + n) for n in _TENSORS]
    lead = x.shape[:-1]
    y = torch.ops.hf_efficient.quant_matmul(x.reshape(-1, layer.in_features), *t, layer.out_features,
                                            layer.in_features, bits, group, mode, decode, v_off, "auto")
    y = y.reshape(*lead, layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


for _bits in (2, 3, 4, 8):
    register_fast_path("*", _bits, "cuda", quant_linear_forward, name="triton")

__all__ = ["quant_matmul", "choose_kernel", "force_kernel", "prepare_model", "repack_layer", "supports",
           "quant_linear_forward", "KERNELS", "LUT_WINS"]
