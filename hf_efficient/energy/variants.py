"""The variant registry: each op we dispatch declares its candidate implementations and launch configs.

A :class:`Candidate` is data (an implementation name and its launch config) with a string key that
round-trips (``acc2d:BLOCK_K=512,BLOCK_N=16,num_stages=1,num_warps=4``), so tuned tables store keys and
the dispatcher rebuilds the call from them. An :class:`OpSpec` says which candidates apply to a shape,
how to run one and how to describe it to the cost model. Registered here: ``bf16_gemv`` (M <= 16: the
three Triton reductions of :mod:`hf_efficient.kernels.energy_gemv` and cuBLAS) and ``bf16_gemm``
(tensor-core Triton tiles and cuBLAS: a power-capped op, the control). Quantized GEMV/GEMM and the
SeerAttention kernels do not declare variants yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Callable

import torch

from .costmodel import H200, GPUSpec, kernel_features

_INT_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@dataclass(frozen=True)
class Candidate:
    impl: str
    config: tuple = ()  # sorted (name, value) pairs

    @staticmethod
    def make(impl: str, **config) -> "Candidate":
        return Candidate(impl, tuple(sorted(config.items())))

    @property
    def key(self) -> str:
        return self.impl + (":" + ",".join(f"{k}={v}" for k, v in self.config) if self.config else "")

    @staticmethod
    def from_key(key: str) -> "Candidate":
        impl, _, rest = key.partition(":")
        cfg = {}
        for part in filter(None, rest.split(",")):
            name, eq, val = part.partition("=")
            if not eq or name not in _INT_FIELDS or not val.lstrip("-").isdigit():
                raise ValueError(f"bad candidate key {key!r}: {part!r} is not NAME=INT with NAME in {_INT_FIELDS}")
            cfg[name] = int(val)
        return Candidate.make(impl, **cfg)

    @property
    def kwargs(self) -> dict:
        return dict(self.config)


@dataclass(frozen=True)
class OpSpec:
    name: str
    candidates: Callable[[int, int, int], list[Candidate]]  # (m, n, k) -> candidates valid for that shape
    run: Callable[[Candidate, torch.Tensor, torch.Tensor], torch.Tensor]
    max_m: int | None = None

    def features(self, c: Candidate, m: int, n: int, k: int, gpu: GPUSpec = H200) -> dict:
        meta = {}
        if c.impl != "library":
            from ..kernels.energy_gemv import compiled_metadata

            meta = compiled_metadata("gemm" if c.impl == "gemm" else c.impl, **c.kwargs)
        return kernel_features(c.impl, m, n, k, c.kwargs, meta, gpu)


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Declare an op's candidates; the name must be new."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is already registered")
    OPS[spec.name] = spec
    return spec


def get_op(name: str) -> OpSpec:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; registered: {sorted(OPS)}")
    return OPS[name]


def op_for(m: int) -> str:
    """The op a ``(m, k) x (n, k)`` bf16 linear dispatches to."""
    return "bf16_gemv" if m <= OPS["bf16_gemv"].max_m else "bf16_gemm"


def _library(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


def _gemv_candidates(m: int, n: int, k: int) -> list[Candidate]:
    out = [Candidate.make("library")]
    for impl, bn, bk, warps in product(("acc1d", "acc2d"), (8, 16, 32), (256, 512), (4, 8)):
        # acc2d holds a BLOCK_N x BLOCK_K fp32 tile in registers: beyond 64 per thread it spills
        if impl == "acc2d" and bn * bk // (warps * 32) > 64:
            continue
        out.append(Candidate.make(impl, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1))
    for bn, bk, stages in product((32, 64, 128), (128, 256), (3, 4)):
        out.append(Candidate.make("dot", BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=stages))
    return out


def _run_gemv(c: Candidate, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if c.impl == "library":
        return _library(x, w)
    from ..kernels.energy_gemv import gemv

    return gemv(x, w, c.impl, **c.kwargs)


def _gemm_candidates(m: int, n: int, k: int) -> list[Candidate]:
    out = [Candidate.make("library")]
    for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)):
        out.append(Candidate.make("gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                                  num_stages=stages))
    return out


def _run_gemm(c: Candidate, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if c.impl == "library":
        return _library(x, w)
    from ..kernels.energy_gemv import gemm

    return gemm(x, w, **c.kwargs)


register_op(OpSpec("bf16_gemv", _gemv_candidates, _run_gemv, max_m=16))
register_op(OpSpec("bf16_gemm", _gemm_candidates, _run_gemm))
