"""Configuration of L0 structured pruning (hard-concrete gates + Lagrangian + layerwise distillation)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
STRUCTURES = ("heads", "ffn", "conv", "modules")


@dataclass
class L0PruningConfig:
    target_sparsity: float = field(
        default=0.5,
        metadata={"help": "Fraction of the model's parameters to remove, in [0, 1). 0.5 halves the model."},
    )
    warmup_steps: int = field(
        default=100,
        metadata={"help": "Steps over which the target sparsity ramps linearly to target_sparsity, from the "
                  "gates' initial expected sparsity (so the Lagrangian starts at zero)."},
    )
    structures: tuple[str, ...] = field(
        default=STRUCTURES,
        metadata={"help": "What gets gates: 'heads' (attention heads), 'ffn' (macaron FFN neurons), 'conv' "
                  "(convolution-module channels), 'modules' (whole attention / conv / FFN modules per block)."},
    )
    distill_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "Encoder block indices whose outputs are distilled from the teacher; None: every block."},
    )
    distill_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the layerwise distillation loss."})
    ctc_weight: float = field(default=1.0, metadata={"help": "Weight of the student's CTC loss."})
    gate_lr: float = field(default=0.05, metadata={"help": "Learning rate of the gates' log alpha."})
    lambda_lr: float = field(default=0.05, metadata={"help": "Learning rate of the gradient ascent on lambda1/lambda2."})
    init_keep_prob: float = field(
        default=0.9,
        metadata={"help": "Initial probability that a gate is non-zero; sets log alpha at the start, in (0, 1)."},
    )
    beta: float = field(default=2.0 / 3.0, metadata={"help": "Hard-concrete temperature."})
    stretch: tuple[float, float] = field(
        default=(-0.1, 1.1), metadata={"help": "Hard-concrete stretch interval (l, r), l < 0 < 1 < r."}
    )
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.structures = tuple(self.structures)
        self.stretch = tuple(float(s) for s in self.stretch)
        if self.distill_layers is not None:
            self.distill_layers = tuple(int(i) for i in self.distill_layers)
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity={self.target_sparsity!r}: must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: must be >= 0")
        bad = [s for s in self.structures if s not in STRUCTURES]
        if bad or not self.structures:
            raise ValueError(f"structures={self.structures!r}: each must be one of {STRUCTURES}, at least one")
        for name in ("distill_weight", "ctc_weight", "gate_lr", "lambda_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0.0 < self.init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob={self.init_keep_prob!r}: must be in (0, 1)")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta!r}: must be > 0")
        lo, hi = self.stretch
        if not (lo < 0.0 and hi > 1.0):
            raise ValueError(f"stretch={self.stretch!r}: need l < 0 and r > 1")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version={self.format_version!r}: this version reads {FORMAT_VERSION}")

    def target_at(self, step: int, start: float = 0.0) -> float:
        """The target sparsity at optimizer step ``step``, ramped linearly from ``start``."""
        if self.warmup_steps == 0:
            return self.target_sparsity
        return start + (self.target_sparsity - start) * min(1.0, step / self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["structures"] = list(self.structures)
        d["stretch"] = list(self.stretch)
        d["distill_layers"] = None if self.distill_layers is None else list(self.distill_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "L0PruningConfig":
        return cls(**d)
