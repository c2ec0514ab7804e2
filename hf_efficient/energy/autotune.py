"""Energy-aware selection inside Triton's own autotuner, through its two hooks.

``triton.autotune(configs, key, prune_configs_by={"early_config_prune": hooks.prune}, do_bench=hooks.bench)``:

- ``prune`` (called once per new key, before any timing) ranks the configs with the cost model and keeps
  the ``top_k`` worth measuring: the predicted-fastest one plus the lowest predicted energy among those
  predicted within the latency bound. It also opens a new round.
- ``bench`` (called per kept config) measures latency (``triton.testing.do_bench``) and energy
  (:func:`~hf_efficient.energy.measure.measure_op`), refits the cost model with the measurement, and returns
  Triton a score whose *ordering* is :func:`~hf_efficient.energy.search.choose`'s rule over the round:
  Triton then keeps, as ever, the ``min`` config, which is the energy-aware choice. The score's float value
  is the latency in ms, so Triton's logs still read as times.

The configs' features come from ``features(config, named_args) -> dict`` (see
:func:`~hf_efficient.energy.costmodel.kernel_features`), which the kernel's author writes.
"""
from __future__ import annotations

import logging
from typing import Callable

from .config import EnergyTuneConfig
from .search import Measurement, choose

log = logging.getLogger(__name__)


class _Round:
    def __init__(self, cfg: EnergyTuneConfig):
        self.cfg = cfg
        self.scores: list["EnergyScore"] = []
        self._winner: "EnergyScore | None" = None

    def add(self, s: "EnergyScore") -> None:
        self.scores.append(s)
        self._winner = None

    def rank(self, s: "EnergyScore") -> tuple:
        if self._winner is None:
            ms = [Measurement(str(i), x.joules, x.latency_ms, x.noise_rel) for i, x in enumerate(self.scores)]
            win, _ = choose(ms, self.cfg.eps)
            self._winner = self.scores[int(win.key)]
            self._fastest = min(x.latency_ms for x in self.scores)
        if s is self._winner:
            return (0, 0.0)
        feasible = s.latency_ms <= (1 + self.cfg.eps) * self._fastest
        return (1, s.joules) if feasible else (2, s.latency_ms)


class EnergyScore(float):
    """A latency (ms, the float value) that orders by the round's energy-aware rule."""

    def __new__(cls, latency_ms: float, joules: float, noise_rel: float, rnd: _Round):
        obj = super().__new__(cls, latency_ms)
        obj.latency_ms, obj.joules, obj.noise_rel, obj._round = latency_ms, joules, noise_rel, rnd
        rnd.add(obj)
        return obj

    def _key(self, other):
        if isinstance(other, EnergyScore) and other._round is self._round:
            return self._round.rank(self), self._round.rank(other)
        return float(self), float(other)

    def __lt__(self, other):
        a, b = self._key(other)
        return a < b

    def __gt__(self, other):
        a, b = self._key(other)
        return a > b

    def __le__(self, other):
        return not self.__gt__(other)

    def __ge__(self, other):
        return not self.__lt__(other)

    def __eq__(self, other):
        return self is other

    __hash__ = float.__hash__


class EnergyAutotuneHooks:
    """``prune``/``bench`` for ``triton.autotune``; ``model`` is a :class:`~hf_efficient.energy.costmodel.CostModel`
    (None: no pruning, every config measured); ``measure`` defaults to :func:`measure_op` on NVML."""

    def __init__(self, features: Callable[[object, dict], dict] | None = None, model=None, top_k: int = 4,
                 config: EnergyTuneConfig | None = None, measure: Callable | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if model is not None and features is None:
            raise ValueError("features is required when a cost model prunes configs")
        self.features, self.model, self.top_k = features, model, top_k
        self.cfg = config or EnergyTuneConfig()
        self.measure = measure
        self._round = _Round(self.cfg)
        self._pending: list[dict] = []
        self.last_pruned: list = []  # the configs Triton benches this round, in bench order
        self.history: list[dict] = []

    def prune(self, configs, named_args, **kwargs):
        self._round = _Round(self.cfg)
        configs = list(configs)
        if self.model is None:
            self._pending = [self.features(c, named_args) if self.features else {} for c in configs]
            self.last_pruned = configs
            return configs
        feats = [self.features(c, named_args) for c in configs]
        pred = self.model.predict(feats)
        order = sorted(range(len(configs)), key=lambda i: pred[i][1])
        keep = [order[0]]
        bound = (1 + self.cfg.eps) * (1 + self.cfg.explore) * pred[order[0]][1]
        for i in sorted((i for i in order[1:] if pred[i][1] <= bound), key=lambda i: pred[i][0]):
            if len(keep) >= self.top_k:
                break
            keep.append(i)
        self._pending = [feats[i] for i in keep]
        self.last_pruned = [configs[i] for i in keep]
        return self.last_pruned

    def bench(self, kernel_call, quantiles=None, **kwargs):
        import triton.testing

        from .measure import measure_op

        lat = triton.testing.do_bench(kernel_call, quantiles=quantiles) if quantiles else \
            [triton.testing.do_bench(kernel_call)]
        lat = list(lat) if isinstance(lat, (list, tuple)) else [lat]
        measure = self.measure or (lambda fn: measure_op(fn, window_s=self.cfg.window_s))
        op = measure(kernel_call)
        feat = self._pending.pop(0) if self._pending else {}
        if self.model is not None and feat:
            self.model.update([feat], [(op.joules_per_op, op.latency_s)])
        self.history.append({"latency_ms": lat[0], "joules": op.joules_per_op, "watts": op.watts,
                             "noise_rel": op.noise_rel})
        log.debug("energy bench: %.4f ms, %.4g J/op", lat[0], op.joules_per_op)
        return [EnergyScore(lat[0], op.joules_per_op, op.noise_rel, self._round)] + lat[1:]
