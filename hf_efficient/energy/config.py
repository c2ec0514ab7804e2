"""Settings of the energy-aware tuner, validated on construction."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

TUNE_MODES = ("latency", "energy")
TUNE_ENV = "HF_EFFICIENT_TUNE"


@dataclass
class EnergyTuneConfig:
    eps: float = field(default=0.05, metadata={"help": "latency slack: candidates up to (1 + eps) x the fastest "
                                                       "latency are eligible; the least energy among them wins"})
    window_s: float = field(default=2.0, metadata={"help": "seconds of counter ticks per energy measurement "
                                                            "(NVML ticks ~every 100 ms: >= 2 s for ~0.4 % noise)"})
    budget_frac: float = field(default=0.2, metadata={"help": "guided search: at most this fraction of the "
                                                               "candidates is measured"})
    min_measurements: int = field(default=3, metadata={"help": "guided search: measure at least this many"})
    batch: int = field(default=2, metadata={"help": "candidates measured per round before the model is refit"})
    early_stop: bool = field(default=False, metadata={"help": "guided search: stop before the budget once no "
                                                               "unmeasured candidate is predicted to save min_gain"})
    min_gain: float = field(default=0.01, metadata={"help": "with early_stop: the predicted saving (fraction of "
                                                             "energy) still worth a measurement"})
    explore: float = field(default=0.05, metadata={"help": "extra latency slack on *predicted* latencies when "
                                                            "picking what to measure (the model errs)"})
    version: int = 1

    def __post_init__(self):
        for name in ("eps", "min_gain", "explore"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not (isinstance(self.window_s, (int, float)) and self.window_s > 0):
            raise ValueError(f"window_s must be > 0 seconds, got {self.window_s!r}")
        if not (isinstance(self.budget_frac, (int, float)) and 0 < self.budget_frac <= 1):
            raise ValueError(f"budget_frac must be in (0, 1], got {self.budget_frac!r}")
        for name in ("min_measurements", "batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"early_stop must be a bool, got {self.early_stop!r}")
        if self.version != 1:
            raise ValueError(f"version must be 1 (the only format this release reads), got {self.version!r}")

    def budget(self, n_candidates: int) -> int:
        """How many of ``n_candidates`` the guided search may measure."""
        return min(n_candidates, max(self.min_measurements, math.floor(self.budget_frac * n_candidates + 1e-9)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EnergyTuneConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown EnergyTuneConfig fields {sorted(unknown)}")
        return cls(**d)


def tune_mode(tune: str | None = None) -> str:
    """The dispatcher's mode: ``tune`` if given, else ``$HF_EFFICIENT_TUNE``, else ``"latency"``."""
    mode = tune if tune is not None else os.environ.get(TUNE_ENV, "latency")
    if mode not in TUNE_MODES:
        src = "tune" if tune is not None else TUNE_ENV
        raise ValueError(f"{src} must be one of {TUNE_MODES}, got {mode!r}")
    return mode
