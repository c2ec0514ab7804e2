"""``QuantLinear``: a linear layer holding packed low-bit weights, and the fast-path seam for kernels.

The forward pass is, by default, the plain-torch reference: unpack the codes, decode them with the
format's scale rule (:mod:`hf_efficient.formats`), and call ``F.linear``. Kernel packages plug faster
paths in with :func:`register_fast_path`; a fast path is tried first and may decline (return None).
Storage layout and tensor names: :mod:`hf_efficient.quantization.packing`.

**One resident layout.** A kernel that reads another layout converts a layer once with
:meth:`QuantLinear.adopt_layout`: the kernel's tensors become the layer's only copy of its weights and the
stored (checkpoint-layout) buffers are freed. ``state_dict()`` (hence ``save_pretrained``), ``codes()``,
``params()`` and ``dequantize()`` rebuild the checkpoint tensors from the kernel layout on demand through the
layout's ``to_storage``, so checkpoints stay portable between devices and kernels; ``load_state_dict`` and
:meth:`QuantLinear.release_layout` go back to the stored layout.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats
from ..blocks import row_blocks
from .packing import FORMAT_VERSION, expand_groups, n_groups, pack_codes, packed_width, unpack_codes

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# ------------------------------------------------------------------------------------------------
# Fast-path registry
# ------------------------------------------------------------------------------------------------
FastPath = Callable[[torch.Tensor, "QuantLinear"], "torch.Tensor | None"]
_FAST_PATHS: dict[tuple[str, int, str], list[tuple[str, FastPath]]] = {}
_state = threading.local()


def register_fast_path(fmt: str, bits: int, device_type: str, fn: FastPath, name: str | None = None) -> None:
    """Register ``fn(x, layer) -> y | None`` for layers of format ``fmt`` and ``bits`` on ``device_type``.

    ``fmt`` is a catalog name (``"fp4_asym"``), a kind (``"int"``, ``"fp"``, ``"nf"``) or ``"*"``; lookup
    tries the name, then the kind, then ``"*"``, newest registration first within each. ``fn`` gets the
    input ``x`` (..., in_features) and the layer (read ``layer.fmt``, ``layer.group_size``, ``layer.qweight``,
    the scale tensors of ``layer.fmt.param_names``, ``layer.bias``) and returns the output (bias included)
    or None to decline (unsupported shape, dtype, group size); the reference path then runs. Layers that
    quantize activations (``layer.act_fmt`` set, W8A8) never call fast paths. Registering the same
    ``name`` twice for one key replaces the earlier entry.
    """
    if device_type not in ("cpu", "cuda", "xpu", "mps", "*"):
        raise ValueError(f"device_type must be cpu, cuda, xpu, mps or '*', got {device_type!r}")
    if fmt != "*" and fmt not in formats.KINDS:
        formats.get_format(fmt)  # raises on unknown names
    name = name or getattr(fn, "__qualname__", repr(fn))
    entries = [e for e in _FAST_PATHS.setdefault((fmt, int(bits), device_type), []) if e[0] != name]
    _FAST_PATHS[(fmt, int(bits), device_type)] = [(name, fn)] + entries


def unregister_fast_path(fmt: str, bits: int, device_type: str, name: str) -> None:
    key = (fmt, int(bits), device_type)
    _FAST_PATHS[key] = [e for e in _FAST_PATHS.get(key, []) if e[0] != name]


def fast_paths_for(fmt: formats.NumericFormat, device_type: str) -> list[tuple[str, FastPath]]:
    out = []
    for f in (fmt.name, fmt.kind, "*"):
        for d in (device_type, "*"):
            out += _FAST_PATHS.get((f, fmt.bits, d), [])
    return out


@contextlib.contextmanager
def reference_only():
    """Within this block every QuantLinear uses the plain-torch path (tests compare fast paths to it)."""
    old = getattr(_state, "reference_only", False)
    _state.reference_only = True
    try:
        yield
    finally:
        _state.reference_only = old


@dataclass
class ResidentLayout:
    """A layer's weights in a kernel's layout, held instead of the stored buffers.

    ``kind`` names the layout (e.g. ``"cuda"``, ``"cpu-lut"``); fast paths check it before using ``meta``.
    ``tensors`` become non-persistent buffers of the layer (named ``_rl_<name>``, so ``.to()`` moves them);
    read them with :meth:`QuantLinear.layout_tensor`. ``to_storage(layer)`` returns the checkpoint tensors
    (``qweight`` and the format's parameters, as :func:`storage_tensors` makes them) from those buffers.
    ``meta`` is whatever else the kernel needs (Python values, never tensors).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    to_storage: Callable[["QuantLinear"], dict[str, torch.Tensor]]
    meta: Any = None
    names: tuple[str, ...] = field(default=(), init=False)


# ------------------------------------------------------------------------------------------------
# Quantizing one weight matrix
# ------------------------------------------------------------------------------------------------

def check_finite(w: torch.Tensor, name: str | None) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        kinds = [k for k, m in (("NaN", torch.isnan(w)), ("Inf", torch.isinf(w))) if m.any()]
        raise ValueError(f"cannot quantize layer {name or '<unnamed>'}: its weight has {bad} non-finite values "
                         f"({'/'.join(kinds)})")


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """``None``, -1 or 0 mean per-channel (one group of ``in_features``)."""
    if group_size in (None, -1, 0):
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or -1 (per-channel), got {group_size!r}")
    return min(group_size, in_features)


def group_params(fmt: formats.NumericFormat, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> dict:
    """Fit the format's per-group parameters to ``w`` (N, K): {name: (N, n_groups) float32}."""
    n, k = w.shape
    ng = n_groups(k, group_size)
    pad = ng * group_size - k
    if pad:
        # A short last group: pad with copies of its own first column, which leaves its min/max/absmax
        # unchanged, so the fit equals fitting the short group alone.
        w = torch.cat([w, w[:, (ng - 1) * group_size:][:, :1].expand(n, pad)], dim=1)
    return formats.fit_params(fmt, w.reshape(n, ng, group_size), scale_dtype)


# Elements quantized at a time: the float32 copies, per-column parameters and search indices of one chunk
# stay near 40 MB, so quantizing a large tensor on load costs about that much beyond the tensor itself.
RTN_CHUNK_ELEMENTS = 2 ** 20


def rtn_quantize(w: torch.Tensor, fmt: formats.NumericFormat, group_size: int, scale_dtype: torch.dtype,
                 name: str | None = None) -> tuple[torch.Tensor, dict]:
    """Round-to-nearest: ``(codes uint8 (N, K), {param: (N, n_groups) float32})``, a block of rows at a time."""
    check_finite(w, name)
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    parts: dict[str, list[torch.Tensor]] = {}
    for r in row_blocks(n, k, RTN_CHUNK_ELEMENTS):
        wc = w[r].detach().float()
        p = group_params(fmt, wc, group_size, scale_dtype)
        codes[r] = formats.encode(fmt, wc, {q: expand_groups(t, k, group_size) for q, t in p.items()})
        for q, t in p.items():
            parts.setdefault(q, []).append(t)
    return codes, {q: torch.cat(ts) for q, ts in parts.items()}


def storage_tensors(fmt: formats.NumericFormat, codes: torch.Tensor, params: dict, scale_dtype: torch.dtype) -> dict:
    """The tensors a QuantLinear stores (``qweight`` and the format's parameters) from codes + params.

    Each parameter is stored as its scheme declares (:class:`hf_efficient.schemes.Param`); ValueError if one is
    missing or a scale overflows ``scale_dtype``."""
    out = {"qweight": pack_codes(codes, fmt.bits)}
    missing = [p for p in fmt.param_names if p not in params]
    if missing:
        raise ValueError(f"format {fmt.name} stores {fmt.param_names}; missing {missing}")
    for p in fmt.scale_scheme.params:
        out[p.name] = p.to_storage(params[p.name], scale_dtype)
        if not p.integer and not torch.isfinite(out[p.name]).all():
            raise ValueError(f"a {p.name} value overflows {scale_dtype}; use scale_dtype='float32'")
    return out


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """Linear layer with weights in a low-bit :class:`~hf_efficient.formats.NumericFormat`.

    Args:
        in_features, out_features: as ``nn.Linear``.
        fmt: format name or object (weights).
        group_size: columns per group along ``in_features``; None/-1 = per-channel. Need not divide
            ``in_features`` (the last group is shorter).
        bias: whether the layer has a float bias.
        scale_dtype: storage dtype of the scales (torch dtype or name).
        act_fmt: if set, activations are fake-quantized per token to this format before the matmul (W8A8).
    Buffers: ``qweight`` and the format's ``param_names`` (layout in :mod:`~hf_efficient.quantization.packing`).
    """

    format_version = FORMAT_VERSION

    def __init__(self, in_features: int, out_features: int, fmt, group_size: int | None = None, bias: bool = False,
                 scale_dtype=torch.float16, act_fmt=None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = formats.get_format(fmt)
        self.act_fmt = formats.get_format(act_fmt) if act_fmt is not None else None
        self.group_size = resolve_group_size(group_size, self.in_features)
        self.scale_dtype = SCALE_DTYPES[scale_dtype] if isinstance(scale_dtype, str) else scale_dtype
        ng = n_groups(self.in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(self.out_features, packed_width(self.in_features, self.fmt.bits),
                                                    dtype=torch.int32, device=device))
        for p in self.fmt.scale_scheme.params:
            self.register_buffer(p.name, torch.zeros(self.out_features, ng, device=device,
                                                     dtype=p.storage_dtype(self.scale_dtype)))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype or torch.float32),
                                 requires_grad=False) if bias else None
        self.layout: ResidentLayout | None = None
        self._register_state_dict_hook(_storage_into_state_dict)
        self._register_load_state_dict_pre_hook(_release_before_load, with_module=True)

    # peft (and AutoGPTQ-era tools) look for these names on quantized linears.
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt, group_size: int | None = None, scale_dtype=torch.float16,
                    act_fmt=None, name: str | None = None) -> "QuantLinear":
        """Round-to-nearest quantization of an ``nn.Linear`` (``name`` appears in error messages)."""
        q = cls(linear.in_features, linear.out_features, fmt, group_size, linear.bias is not None, scale_dtype,
                act_fmt, device=linear.weight.device, dtype=linear.weight.dtype)
        codes, params = rtn_quantize(linear.weight, q.fmt, q.group_size, q.scale_dtype, name)
        q.load_quantized(codes, params)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def load_quantized(self, codes: torch.Tensor, params: dict) -> None:
        """Store codes (N, K) uint8 and per-group params {name: (N, n_groups)} into this layer's buffers."""
        self.release_layout()
        for k, t in storage_tensors(self.fmt, codes, params, self.scale_dtype).items():
            getattr(self, k).copy_(t)

    # --- the resident layout -------------------------------------------------------------------------
    def storage_names(self) -> tuple[str, ...]:
        return ("qweight",) + tuple(self.fmt.param_names)

    def storage(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors (``qweight`` + params), rebuilt from the kernel layout if one is adopted."""
        if self.layout is not None:
            return self.layout.to_storage(self)
        return {n: getattr(self, n) for n in self.storage_names()}

    def layout_tensor(self, name: str) -> torch.Tensor:
        return getattr(self, "_rl_" + name)

    def replace_layout_tensor(self, name: str, t: torch.Tensor) -> None:
        """Swap one tensor of the adopted layout for ``t`` (the same values elsewhere in memory)."""
        self.register_buffer("_rl_" + name, t, persistent=False)

    def adopt_layout(self, layout: ResidentLayout) -> None:
        """Make ``layout`` this layer's only copy of its weights (any earlier layout is converted back first)."""
        self.release_layout()
        layout.names = tuple(layout.tensors)
        for n, t in layout.tensors.items():
            self.register_buffer("_rl_" + n, t, persistent=False)
        layout.tensors = {}  # the buffers are the copy; .to() moves those, not this dict
        self.layout = layout
        for n in self.storage_names():  # free the stored copy, keep dtype and device
            old = getattr(self, n)
            self.register_buffer(n, old.new_empty(0))

    def release_layout(self) -> None:
        """Go back to the stored (checkpoint) layout; no-op without an adopted layout."""
        layout = self.layout
        if layout is None:
            return
        stored = layout.to_storage(self)
        self.layout = None
        for n in layout.names:
            delattr(self, "_rl_" + n)
        for n, t in stored.items():
            self.register_buffer(n, t)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.storage()["qweight"], self.fmt.bits, self.in_features)

    def params(self) -> dict:
        st = self.storage()
        return {p: st[p] for p in self.fmt.param_names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight this layer represents."""
        st = self.storage()
        cols = {p: expand_groups(st[p], self.in_features, self.group_size) for p in self.fmt.param_names}
        return formats.decode(self.fmt, unpack_codes(st["qweight"], self.fmt.bits, self.in_features), cols, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fmt is None and not getattr(_state, "reference_only", False):
            for _, fn in fast_paths_for(self.fmt, x.device.type):
                y = fn(x, self)
                if y is not None:
                    return y
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fmt is not None:
            x = formats.quantize_per_token(self.act_fmt, x.float()).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        act = f", act_fmt={self.act_fmt.name}" if self.act_fmt else ""
        lay = f", layout={self.layout.kind}" if self.layout is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.name}, "
                f"group_size={self.group_size}, bias={self.bias is not None}{act}{lay}")


def _storage_into_state_dict(module: QuantLinear, state_dict, prefix, local_metadata):
    # Checkpoints always hold the stored layout, whatever kernel layout the layer runs on.
    if module.layout is not None:
        for n, t in module.layout.to_storage(module).items():
            state_dict[prefix + n] = t
    return state_dict


def _release_before_load(module: QuantLinear, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    # Loaded tensors are in the stored layout: shape the buffers for them (a kernel adopts again on use).
    if module.layout is not None and any(k.startswith(prefix) for k in state_dict):
        module.release_layout()
