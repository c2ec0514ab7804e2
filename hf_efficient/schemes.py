"""Scale schemes as data: how a group of weights maps onto a format's value grid.

A :class:`Scheme` declares, in one row of :data:`SCHEMES`, everything the rest of the code reads about a
scale rule: the per-group tensors a layer stores (names, and whether each is a scale kept in the layer's
scale dtype or an integer kept as uint8), the kernels' ``MODE`` constant, and the decode rule. Formats
(:mod:`hf_efficient.formats`), packing and checkpoints, the plain-torch references and the kernels read it;
nothing else spells a scheme's name or assumes how many parameters it has.

Kernels see a scheme's parameters by position: ``params[0]`` is the kernels' ``a`` and ``params[1]`` (when
there is one) their ``b``; a one-parameter scheme gets ``b = a``. With ``v`` the grid value of a code:

``sym``         ``value = v * a``                          (``a`` = ``scales``)
``zero_point``  ``value = (v - b) * a``                    (``a`` = ``scales``, ``b`` = integer ``zeros``)
``two_scale``   ``value = v * (b if v < 0 else a)``        (``a`` = ``scales_pos``, ``b`` = ``scales_neg``)

The rule is the two flags ``offset`` (``b`` is subtracted from ``v``) and ``split_sign`` (``b`` scales the
negative grid values); :meth:`Scheme.apply` is its one torch definition. The Triton and CUDA kernels
implement each ``mode`` natively (a compile-time constant) and are tested against it.

This module imports only torch, so kernels can read it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Param:
    """One per-group tensor of a scheme. ``integer``: stored as uint8 (a zero point), else in the scale dtype."""

    name: str
    integer: bool = False

    def storage_dtype(self, scale_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8 if self.integer else scale_dtype

    def to_storage(self, t: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
        return t.round().to(torch.uint8) if self.integer else t.to(scale_dtype)


@dataclass(frozen=True)
class Scheme:
    """A scale scheme (module docstring). ``params`` are in kernel order (``a``, then ``b``)."""

    name: str
    params: tuple[Param, ...]
    mode: int
    offset: bool = False
    split_sign: bool = False
    description: str = ""

    def __post_init__(self):
        if not 1 <= len(self.params) <= 2:
            raise ValueError(f"scheme {self.name}: kernels take one or two parameters (a, b), got {len(self.params)}")
        if (self.offset or self.split_sign) and len(self.params) != 2:
            raise ValueError(f"scheme {self.name}: offset/split_sign read a second parameter b")
        if self.offset and self.split_sign:
            raise ValueError(f"scheme {self.name}: b is either an offset or the negative scale, not both")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"scheme {self.name} has no parameter {name!r}; it has {self.param_names}")

    # --- named parameters <-> the kernels' (a, b) ---------------------------------------------------
    def kernel_ab(self, params: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(a, b)`` from ``{name: tensor}``; ``b`` is None for a one-parameter scheme."""
        a = params[self.params[0].name]
        return a, (params[self.params[1].name] if len(self.params) > 1 else None)

    def from_kernel(self, a: torch.Tensor, b: torch.Tensor | None) -> dict:
        """``{name: tensor}`` from the kernels' ``a``/``b`` (``b`` ignored by a one-parameter scheme)."""
        return dict(zip(self.param_names, (a, b)))

    # --- the decode rule ----------------------------------------------------------------------------
    def apply(self, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The weight of grid values ``v`` under ``a``/``b`` (broadcastable to ``v``), in ``v``'s arithmetic."""
        if self.offset:
            return (v - b) * a
        if self.split_sign:
            return v * torch.where(v < 0, b, a)
        return v * a

    def value_split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f1, f2)`` with ``apply(v, a, b) == a * f1 + second_coef(a, b) * f2`` (exact in real arithmetic).

        The LUT formulations scale a table of ``f1`` by ``a`` and one of ``f2`` by :meth:`second_coef`.
        """
        if self.split_sign:
            return v.clamp(min=0), v.clamp(max=0)
        return v, (-torch.ones_like(v) if self.offset else torch.zeros_like(v))

    def second_coef(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The coefficient of ``f2`` in :meth:`value_split`."""
        if self.offset:
            return a * b
        return b if self.split_sign else torch.zeros_like(a)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("sym", (Param("scales"),), mode=0,
           description="one absmax scale per group"),
    Scheme("zero_point", (Param("scales"), Param("zeros", integer=True)), mode=1, offset=True,
           description="one scale and one integer zero point per group (INT asymmetric, as GPTQ)"),
    Scheme("two_scale", (Param("scales_pos"), Param("scales_neg")), mode=2, split_sign=True,
           description="AFPQ: one scale for the grid's positive values, one for its negative values"),
)}
_BY_MODE = {s.mode: s for s in SCHEMES.values()}
if len(_BY_MODE) != len(SCHEMES):
    raise RuntimeError("two schemes share a kernel mode")
MODES = tuple(sorted(_BY_MODE))


def get_scheme(name: str | Scheme) -> Scheme:
    if isinstance(name, Scheme):
        return name
    if name not in SCHEMES:
        raise ValueError(f"unknown scale scheme {name!r}; known: {tuple(SCHEMES)}")
    return SCHEMES[name]


def scheme_of_mode(mode: int) -> Scheme:
    """The scheme whose kernel ``mode`` is ``mode``; ValueError lists the valid modes."""
    s = _BY_MODE.get(mode)
    if s is None:
        raise ValueError(f"mode must be one of {MODES} ({', '.join(f'{m}={_BY_MODE[m].name}' for m in MODES)}), "
                         f"got {mode!r}")
    return s
