"""Pre-gated MoE settings: expert offloading (changeable any time) and the pre-gate format (fixed once trained)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

FORMAT_VERSION = 1
# on_demand: fetch what the router chose, keep nothing between steps (the floor every predictor must beat).
# lru: per-layer LRU cache of the budget, no prediction (mixtral-offloading's scheme).
# prefetch_all: while layer i computes, copy every expert of layer i+1 that fits its cache share.
# speculative: layer i+1's own router run on layer i's input predicts; true routing still executes (exact).
# pregated: a pre-gate in layer i *chooses* layer i+1's experts (the paper); outputs follow the pre-gate.
MODES = ("on_demand", "lru", "prefetch_all", "speculative", "pregated")
PREDICTIVE_MODES = ("prefetch_all", "speculative", "pregated")


@dataclass(frozen=True)
class OffloadConfig:
    gpu_budget_gb: float = field(default=4.0, metadata={"help": "device memory (GiB, 2**30 bytes) for cached "
                                                                   "experts of all MoE layers together; split evenly "
                                                                   "between layers; at least top_k experts per layer"})
    mode: str = field(default="speculative", metadata={"help": f"expert prediction mode, one of {MODES}"})
    device: str | None = field(default=None, metadata={"help": "compute device of the experts (default: the device "
                                                                "of the model's routers)"})
    pin_memory: bool | None = field(default=None, metadata={"help": "page-lock the host copy of the experts so copies "
                                                                     "run asynchronously (default: when the device is "
                                                                     "CUDA)"})

    def __post_init__(self):
        if not (isinstance(self.gpu_budget_gb, (int, float)) and self.gpu_budget_gb > 0):
            raise ValueError(f"OffloadConfig.gpu_budget_gb={self.gpu_budget_gb!r} is invalid; allowed: a positive "
                             f"number of GiB")
        if self.mode not in MODES:
            raise ValueError(f"OffloadConfig.mode={self.mode!r} is invalid; allowed: {MODES}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PregateConfig:
    """What a saved set of pre-gates is: one router-shaped linear map per MoE layer that has a next MoE layer."""

    num_experts: int = field(metadata={"help": "experts per MoE layer of the model the pre-gates belong to"})
    hidden_size: int = field(metadata={"help": "input width of each pre-gate"})
    layers: tuple[int, ...] = field(metadata={"help": "decoder-layer index of each pre-gate's own block; the "
                                                      "pre-gate picks the experts of the next MoE layer"})
    init: str = field(default="next_router", metadata={"help": "how the pre-gates started: 'next_router'"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "version of the saved pre-gate format"})

    def __post_init__(self):
        for name in ("num_experts", "hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PregateConfig.{name}={v!r} is invalid; allowed: an integer >= 1")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.init != "next_router":
            raise ValueError(f"PregateConfig.init={self.init!r} is invalid; allowed: 'next_router'")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"PregateConfig.format_version={self.format_version!r} is invalid; allowed: "
                             f"{FORMAT_VERSION} (this version of hf-efficient)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PregateConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PregateConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
