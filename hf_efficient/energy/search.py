"""Choosing a kernel variant by energy under a latency bound, exhaustively or guided by the cost model.

The rule (:func:`choose`): among candidates whose latency is within ``(1 + eps)`` of the fastest one,
take the least energy per call; but keep the fastest one when the saving is inside the measurement
noise (power-capped ops, where energy follows latency and there is nothing real to gain).

The guided search (:func:`model_search`) follows the seed paper's loop: predict energy and latency of
every unmeasured candidate, measure only the few the model ranks best, refit on what was measured,
repeat until the budget is spent or no unmeasured candidate is predicted to beat the best measured one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .config import EnergyTuneConfig


@dataclass
class Measurement:
    """Measured joules per call and seconds per call of candidate ``key`` (noise: relative std error)."""

    key: str
    joules: float
    latency_s: float
    noise_rel: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def choose(measured: Sequence[Measurement], eps: float = 0.05, noise_k: float = 2.0) -> tuple[Measurement, str]:
    """The energy-aware choice and why: ``"energy"`` (a saving beyond noise), ``"latency"`` (fell back).

    ``noise_k`` standard errors of the two measurements (combined) make the saving "inside the noise"."""
    if not measured:
        raise ValueError("measured must hold at least one Measurement")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    fastest = min(measured, key=lambda m: m.latency_s)
    feasible = [m for m in measured if m.latency_s <= (1 + eps) * fastest.latency_s]
    best = min(feasible, key=lambda m: m.joules)
    saving = 1 - best.joules / fastest.joules
    noise = noise_k * math.hypot(best.noise_rel, fastest.noise_rel)
    if best is fastest or saving <= noise:
        return fastest, "latency"
    return best, "energy"


@dataclass
class SearchResult:
    choice: Measurement
    reason: str
    measured: list[Measurement] = field(default_factory=list)
    rounds: int = 0

    @property
    def n_measured(self) -> int:
        return len(self.measured)


def exhaustive_search(keys: Sequence[str], measure: Callable[[str], Measurement], eps: float = 0.05,
                      progress: bool = False) -> SearchResult:
    """Measure every candidate; the reference the guided search is judged against."""
    from tqdm.auto import tqdm

    measured = [measure(k) for k in tqdm(keys, desc="exhaustive", disable=not progress)]
    choice, reason = choose(measured, eps)
    return SearchResult(choice, reason, measured, rounds=1)


def _impl_of(key: str) -> str:
    return key.split(":")[0]


def model_search(keys: Sequence[str], features: Callable[[str], dict], measure: Callable[[str], Measurement],
                 model, config: EnergyTuneConfig | None = None, progress: bool = False,
                 group: Callable[[str], str] = _impl_of) -> SearchResult:
    """Cost-model-guided search over ``keys``.

    ``features(key)`` gives the cost model's input for a candidate, ``measure(key)`` runs it, ``model`` is a
    :class:`~hf_efficient.energy.costmodel.CostModel` (its prior data, if any, is the cold start). A cold
    model (too few rows to fit) first measures the predicted best of each ``group`` (implementation), so
    the trees see every implementation before ranking. Each round then measures ``config.batch``
    candidates: the predicted-fastest one until a latency anchor exists, then the lowest predicted energy
    among those predicted within the latency bound (then those predicted nearest to it); after each round
    the model is refit with the new measurements. Spends ``config.budget(len(keys))`` measurements, or
    stops earlier, with ``config.early_stop``, once no unmeasured candidate is predicted to save more than
    ``config.min_gain`` over the current choice."""
    from tqdm.auto import tqdm

    cfg = config or EnergyTuneConfig()
    keys = list(keys)
    if not keys:
        raise ValueError("keys must not be empty")
    feats = {k: features(k) for k in keys}
    budget = cfg.budget(len(keys))
    measured: dict[str, Measurement] = {}
    rounds = 0
    bar = tqdm(total=budget, desc="model search", disable=not progress)
    if len(model.rows) < model.min_fit:
        pred = dict(zip(keys, model.predict([feats[k] for k in keys])))
        seeds: dict[str, str] = {}
        for k in sorted(keys, key=lambda k: pred[k][0]):
            seeds.setdefault(group(k), k)
        picks = list(seeds.values())[:budget]
        for k in picks:
            measured[k] = measure(k)
            bar.update(1)
        model.update([feats[k] for k in picks], [(measured[k].joules, measured[k].latency_s) for k in picks])
        rounds += 1
    while len(measured) < budget:
        rest = [k for k in keys if k not in measured]
        if not rest:
            break
        pred = dict(zip(rest, model.predict([feats[k] for k in rest])))  # key -> (joules, latency)
        picks: list[str] = []
        if measured:
            best_lat = min(m.latency_s for m in measured.values())
            current, _ = choose(list(measured.values()), cfg.eps)
        else:
            best_lat, current = math.inf, None
        fast_pred = min(rest, key=lambda k: pred[k][1])
        if pred[fast_pred][1] < best_lat:  # a faster candidate may move the latency bound: anchor it first
            picks.append(fast_pred)
        bound = (1 + cfg.eps) * min(best_lat, pred[fast_pred][1])
        ranked = sorted((k for k in rest if pred[k][1] <= bound * (1 + cfg.explore) and k not in picks),
                        key=lambda k: pred[k][0])
        enough = len(measured) >= cfg.min_measurements
        if cfg.early_stop and enough and current is not None and not picks and \
                (not ranked or pred[ranked[0]][0] > current.joules * (1 - cfg.min_gain)):
            break  # nothing left is predicted to beat the choice we have
        # Budget left but nothing predicted inside the bound: the latency model errs by a few per cent near
        # the bound, so spend it on the candidates predicted nearest to the bound, cheapest first among ties
        ranked += sorted((k for k in rest if k not in ranked and k not in picks),
                         key=lambda k: (round(pred[k][1] / bound, 2), pred[k][0]))
        picks += ranked[: max(0, min(cfg.batch, budget - len(measured)) - len(picks))]
        if not picks:
            break
        for k in picks:
            measured[k] = measure(k)
            bar.update(1)
        model.update([feats[k] for k in picks], [(measured[k].joules, measured[k].latency_s) for k in picks])
        rounds += 1
    bar.close()
    choice, reason = choose(list(measured.values()), cfg.eps)
    return SearchResult(choice, reason, list(measured.values()), rounds)
