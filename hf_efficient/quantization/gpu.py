"""CUDA fast path of :class:`~hf_efficient.quantization.linear.QuantLinear`.

A layer on CUDA adopts **one** kernel layout as its only copy of its weights
(:meth:`QuantLinear.adopt_layout`; checkpoints are rebuilt from it on save):

* ``"cuda-triton"`` (default): the Triton kernels through ``torch.ops.hf_efficient.quant_matmul``, which
  chooses by shape (:func:`choose_kernel`): the dequant GEMV for ``M <= 8``, the dequant GEMM above.
* ``"cuda-tinygemm"`` (default for uniform INT4 layers run with bfloat16 activations where
  :func:`hf_efficient.kernels.quant_tinygemm.unsupported` allows, e.g. INT4-asym/sym at group 32-256, except the
  layers larger than :data:`TINYGEMM_INT4_MAX_WEIGHTS` on the GPUs it lists, which take ``"cuda-mma"``): torch's
  tinygemm kernel up to 16 rows, measured faster than our Triton GEMV at M = 1 (docs/gpu_kernels.md), and
  dequantize + cuBLAS for prompts. ``force_kernel("gemv")``/``("gemm")`` keep such a layer on the Triton layout.
* ``"cuda-mma"``: the tensor-core CUDA kernel of :mod:`hf_efficient.kernels.quant_mma` for 2/3/4-bit weights,
  where the extension builds (once, on first use). "auto" chooses it where :data:`MEASURED_MMA` lists the
  GPU and the format's kind of grid (on the H200: value-table grids such as NF4/NF3, where the Triton kernels
  read the table per weight); elsewhere ``with force_kernel("mma"):`` while the layer first runs or
  :func:`prepare_model` is called. Prompts longer than :data:`MMA_MAX_M` rows dequantize the layer once per
  call (:func:`hf_efficient.kernels.quant_mma.dequantize`: a Triton kernel on CUDA) and run cuBLAS.

The bit-serial LUT GEMM never won a measurement and runs only inside ``force_kernel("lut")``: an experiment
that computes its terms per call instead of keeping buffers in every layer.

Layers adopt their layout when the quantizer finishes loading a model onto CUDA, or on their first CUDA
forward, or with :func:`prepare_model` (call it before ``torch.compile``: a layer without its layout while
compiling falls back to the reference path). Both ops are declared, with their fakes, in
:mod:`hf_efficient.ops`, so ``torch.compile`` traces them without graph breaks; this module registers the
Triton kernels of ``quant_matmul``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import quant_matmul
from .linear import QuantLinear, ResidentLayout, register_fast_path, storage_tensors

logger = logging.getLogger(__name__)

KERNELS = ("auto", "gemv", "gemm", "lut", "mma", "tinygemm")
MMA_MAX_M = 64  # above: dequantize + cuBLAS (benchmarks/results/quant_mma_crossover.md: the mma kernel wins up to 64)
GEMV_MAX_M = 8  # = kernels.quant_gemm.GEMV_MAX_M (not imported here: importing the kernels needs triton)
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
    """Triton kernel for an ``(m, K) x (K, N)`` product with ``bits``-bit weights."""
    req = _forced[-1] if _forced else requested
    if req not in ("auto", "mma", "tinygemm"):  # layers of those layouts never reach the Triton op
        return req
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def _kernel_weight(qweight, params, table, n, k, bits, group_size, mode, decode, v_off):
    from ..kernels.quant_layout import KernelWeight

    return KernelWeight(qweight, params, table, n, k, bits, group_size, mode, decode, v_off)


@quant_matmul.register_kernel(("cpu", "cuda"))
def _quant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, table: torch.Tensor, n: int,
                         k: int, bits: int, group_size: int, mode: int, decode: int, v_off: float,
                         kernel: str) -> torch.Tensor:
    """``torch.ops.hf_efficient.quant_matmul`` on CUDA (and on CPU under ``TRITON_INTERPRET=1``): a Triton kernel
    chosen by :func:`choose_kernel`; on CPU without the interpreter the plain-torch reference."""
    kw = _kernel_weight(qweight, params, table, n, k, bits, group_size, mode, decode, v_off)
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from ..kernels.quant_reference import quant_matmul_reference

        return quant_matmul_reference(x, kw)
    which = choose_kernel(x.shape[0], bits, kernel)
    if which == "gemv" and x.shape[0] > GEMV_MAX_M:
        which = "gemm"
    if which == "lut":
        from ..kernels.quant_lut import quant_lut_gemm

        return quant_lut_gemm(x, kw)  # computes its bit-serial terms per call: an experiment, not a default
    from ..kernels.quant_gemm import quant_gemm, quant_gemv

    return quant_gemv(x, kw) if which == "gemv" else quant_gemm(x, kw)


# ------------------------------------------------------------------------------------------------
# QuantLinear -> kernel layout, once
# ------------------------------------------------------------------------------------------------
_TRITON_TENSORS = ("qweight", "params", "table")
_MMA_TENSORS = ("qweight", "params", "tables")
_TINY_TENSORS = ("qweight", "sz", "scale")
CUDA_LAYOUTS = ("cuda-triton", "cuda-mma", "cuda-tinygemm")


def supports(layer: QuantLinear) -> str | None:
    """None if the GPU kernels can run ``layer``; otherwise the reason they cannot."""
    if layer.act_fmt is not None:
        return "activation quantization"
    reason = None
    if layer.fmt.bits not in (2, 3, 4, 8):
        reason = f"bits={layer.fmt.bits}"
    elif layer.group_size % 32:
        reason = f"group_size={layer.group_size} is not a multiple of 32"
    # checked only where the Triton kernels cannot run the layer: this runs at every forward
    return None if reason is None or _mma_kind(layer) else reason


# The layout "auto" gives a format by how its grid decodes (DECODE_TABLE: NF and other value tables; DECODE_INT;
# DECODE_E2M1), per GPU, where one same-run measurement of both kernels says the mma kernel wins at M <= MMA_MAX_M
# (benchmarks/results/quant_gemv.md: mma vs Triton rows of the same run; docs/gpu_kernels.md). Anything not
# listed keeps the Triton layout. INT4 at bf16 takes tinygemm's layout first where it applies (_wanted_layout), up to
# the layer size TINYGEMM_INT4_MAX_WEIGHTS gives for the GPU.
MEASURED_MMA = {
    "NVIDIA H200": {"table", "int", "e2m1"},
    # same-run on an H100 (round 6, benchmarks/results/quant_gemv_summary.md and quant_e2e.md): mma faster than
    # Triton for every kind at M = 1 and 16; 7B-shaped NF4-asym decode 1.54x bf16 on mma, 0.99x on Triton
    "NVIDIA H100 80GB HBM3": {"table", "int", "e2m1"},
}


# INT4 at bf16 keeps tinygemm's layout on layers of at most this many weights (N x K), and takes the mma layout above,
# per GPU where a same-run measurement of both says so (benchmarks/results/quant_gemv.md, round 9 on an H100:
# `ours` = mma against `ours-tinygemm` = the tinygemm layout's path). There, at one row, tinygemm is 1.33x faster on
# 4096x4096 and within 3 % either way on the five larger shapes, while the mma kernel is 1.8-3.8x faster at 16 rows,
# 1.6-2.9x at 64 and 1.1-1.5x at 4 on those five: the layout is fixed at load, before the batch size is known, so
# the larger layers take the layout that serves batches. GPUs not listed keep tinygemm's layout for every INT4 layer.
TINYGEMM_INT4_MAX_WEIGHTS = {
    "NVIDIA H100 80GB HBM3": 4096 * 4096,
}


def _int4_mma_by_shape(layer: QuantLinear) -> bool:
    """Whether "auto" gives this INT4 layer the mma layout rather than tinygemm's (:data:`TINYGEMM_INT4_MAX_WEIGHTS`)."""
    if not torch.cuda.is_available():
        return False
    limit = TINYGEMM_INT4_MAX_WEIGHTS.get(torch.cuda.get_device_name(torch.cuda.current_device()))
    return limit is not None and layer.out_features * layer.in_features > limit and _mma_kind(layer)


def _mma_measured_faster(layer: QuantLinear) -> bool:
    return torch.cuda.is_available() and _measured(tuple(layer.fmt.grid), torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _measured(grid: tuple, device: int) -> bool:
    from ..kernels.quant_layout import DECODE_INT, DECODE_TABLE, choose_decode

    decode = choose_decode([float(v) for v in grid])[0]
    kind = "table" if decode == DECODE_TABLE else "int" if decode == DECODE_INT else "e2m1"
    return kind in MEASURED_MMA.get(torch.cuda.get_device_name(device), ())


def _mma_kind(layer: QuantLinear) -> bool:
    from ..kernels import quant_mma

    forced = _forced[-1] if _forced else "auto"
    if forced not in ("auto", "mma") or (forced == "auto" and not _mma_measured_faster(layer)):
        return False
    return (layer.fmt.bits in quant_mma.MMA_BITS and layer.group_size % 16 == 0 and layer.act_fmt is None
            and (not layer.fmt.scale_scheme.offset or quant_mma.zero_point_foldable(layer.fmt.grid))
            and quant_mma.extension() is not None)


def _from_kernel(layer: QuantLinear, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict:
    return storage_tensors(layer.fmt, codes, layer.fmt.scale_scheme.from_kernel(a, b), layer.scale_dtype)


def _mma_storage(layer: QuantLinear) -> dict:
    from ..kernels.quant_mma import MmaWeight, unpack

    t = [layer.layout_tensor(n) for n in _MMA_TENSORS]
    return _from_kernel(layer, *unpack(MmaWeight(*t, layer.out_features, layer.in_features, *layer.layout.meta)))


def _triton_storage(layer: QuantLinear) -> dict:
    from ..kernels.quant_layout import unpack

    kw = _kernel_weight(*[layer.layout_tensor(n) for n in _TRITON_TENSORS], layer.out_features, layer.in_features,
                        *layer.layout.meta)
    return _from_kernel(layer, unpack(kw), kw.params[0], kw.params[1])


def _tiny_storage(layer: QuantLinear) -> dict:
    from ..kernels.quant_tinygemm import TinyWeight, unpack

    t = [layer.layout_tensor(n) for n in _TINY_TENSORS]
    codes, a, b = unpack(TinyWeight(*t, layer.out_features, layer.in_features, *layer.layout.meta))
    return _from_kernel(layer, codes, a, b)


def _tiny_reason(layer: QuantLinear, a: torch.Tensor, b: torch.Tensor | None) -> str | None:
    from ..kernels.quant_tinygemm import unsupported

    fmt = layer.fmt
    return unsupported(fmt.bits, fmt.grid, fmt.scale_scheme.mode, layer.group_size, layer.out_features,
                       layer.in_features, a, b)


def _wanted_layout(layer: QuantLinear, dtype: torch.dtype | None, a=None, b=None) -> str:
    """The layout ``layer`` should hold for activations of ``dtype`` under the forced kernel (if any)."""
    forced = _forced[-1] if _forced else "auto"
    if (forced in ("auto", "tinygemm") and dtype == torch.bfloat16 and layer.fmt.bits == 4
            and not (forced == "auto" and _int4_mma_by_shape(layer))):
        if a is None:
            a, b = layer.fmt.scale_scheme.kernel_ab(layer.storage())
        if _tiny_reason(layer, a, b) is None:
            return "cuda-tinygemm"
    return "cuda-mma" if _mma_kind(layer) else "cuda-triton"


def repack_layer(layer: QuantLinear, dtype: torch.dtype | None = None) -> None:
    """Give ``layer`` its kernel layout as its only weight copy: ``"cuda-tinygemm"`` where it applies to
    activations of ``dtype`` (module docstring), ``"cuda-mma"`` when forced, else ``"cuda-triton"``."""
    reason = supports(layer)
    if reason:
        raise ValueError(f"the GPU kernels cannot run {layer.extra_repr()}: {reason}")
    fmt = layer.fmt
    a, b = fmt.scale_scheme.kernel_ab(layer.storage())
    b = b.to(a.dtype) if b is not None else None
    codes = layer.codes()
    mode = fmt.scale_scheme.mode
    kind = _wanted_layout(layer, dtype, a, b)
    if kind == "cuda-tinygemm":
        from ..kernels.quant_tinygemm import pack as tiny_pack

        w = tiny_pack(codes, a, b, fmt.grid, layer.group_size, mode)
        layout = ResidentLayout(kind, {n: getattr(w, n) for n in _TINY_TENSORS}, _tiny_storage,
                                (w.group_size, w.mode, w.v_off))
    elif kind == "cuda-mma":
        from ..kernels.quant_mma import pack

        w = pack(codes, a, b, fmt.grid, fmt.bits, layer.group_size, mode)
        layout = ResidentLayout("cuda-mma", {n: getattr(w, n) for n in _MMA_TENSORS}, _mma_storage,
                                (w.bits, w.group_size, w.mode))
    else:
        from ..kernels.quant_layout import repack

        kw = repack(codes, a, b, fmt.grid, fmt.bits, layer.group_size, mode)
        layout = ResidentLayout("cuda-triton", {n: getattr(kw, n) for n in _TRITON_TENSORS}, _triton_storage,
                                (kw.bits, kw.group_size, kw.mode, kw.decode, kw.v_off))
    layer.adopt_layout(layout)


def prepare_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Give every supported QuantLinear of ``model`` that sits on CUDA its kernel layout for activations of
    ``dtype`` (default: ``model.dtype``, where the model has one); returns how many."""
    if dtype is None:
        dtype = getattr(model, "dtype", None)
    count = 0
    for mod in model.modules():
        if (isinstance(mod, QuantLinear) and supports(mod) is None
                and any(t.is_cuda for t in mod.buffers(recurse=False))):
            if not _ready(mod, dtype):
                repack_layer(mod, dtype)
            count += 1
    return count


def _ready(layer: QuantLinear, dtype: torch.dtype | None) -> bool:
    """Whether the layer's layout serves this call: an adopted layout stays (whatever the activations' dtype)
    unless a kernel of another layout is forced (``force_kernel("mma")``, ``("tinygemm")`` or a Triton one)."""
    lay = layer.layout
    if lay is None or lay.kind not in CUDA_LAYOUTS:
        return False
    if not _forced or _forced[-1] == "auto" or torch.compiler.is_compiling():
        return True
    return lay.kind == _wanted_layout(layer, dtype)


def quant_linear_forward(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor | None:
    """The fast path registered for QuantLinear on CUDA (declines by returning None)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or supports(layer) is not None:
        return None
    if not _ready(layer, x.dtype):
        if torch.compiler.is_compiling():
            logger.warning("QuantLinear has no kernel layout while compiling: call "
                           "hf_efficient.quantization.gpu.prepare_model(model) first; using the reference path")
            return None
        repack_layer(layer, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    meta = layer.layout.meta
    if layer.layout.kind == "cuda-tinygemm":
        q, sz = layer.layout_tensor("qweight"), layer.layout_tensor("sz")
        y = torch.ops.hf_efficient.quant_tinygemm(x2, q, sz, layer.out_features, layer.in_features, meta[0])
    elif layer.layout.kind == "cuda-mma":
        t = [layer.layout_tensor(n) for n in _MMA_TENSORS]
        if x2.shape[0] > MMA_MAX_M:
            from ..kernels.quant_mma import MmaWeight, dequantize

            y = F.linear(x2, dequantize(MmaWeight(*t, layer.out_features, layer.in_features, *meta), x.dtype))
        else:
            y = torch.ops.hf_efficient.quant_mma(x2, *t, layer.out_features, layer.in_features, *meta, 0)
    else:
        t = [layer.layout_tensor(n) for n in _TRITON_TENSORS]
        y = torch.ops.hf_efficient.quant_matmul(x2, *t, layer.out_features, layer.in_features, *meta, "auto")
    y = y.reshape(*lead, layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y


for _bits in (2, 3, 4, 8):
    register_fast_path("*", _bits, "cuda", quant_linear_forward, name="cuda")

__all__ = ["quant_matmul", "choose_kernel", "CUDA_LAYOUTS", "MEASURED_MMA", "TINYGEMM_INT4_MAX_WEIGHTS", "force_kernel", "prepare_model", "repack_layer", "supports",
           "quant_linear_forward", "KERNELS", "MMA_MAX_M"]
