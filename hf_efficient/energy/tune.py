"""Tuning the linear shapes of a model: measure, choose, and write a table in the shipped format.

``linear_shapes(config)`` lists the distinct ``(out_features, in_features)`` of a model's ``nn.Linear``
layers (built on the meta device: no weights are loaded). ``tune_shapes`` runs the guided search (or the
exhaustive one) for each shape and batch on the current CUDA device with random bf16 weights (speed and
energy of these kernels do not depend on the values) and returns the table :mod:`.tables` reads.
"""
from __future__ import annotations

import logging
import time

import torch

from .config import EnergyTuneConfig
from .costmodel import CostModel
from .search import Measurement, exhaustive_search, model_search
from .tables import FORMAT_VERSION, shape_key, training_rows
from .variants import get_op, op_for

log = logging.getLogger(__name__)


def linear_shapes(config) -> list[tuple[int, int, int]]:
    """``[(out_features, in_features, count), ...]`` of a transformers config's ``nn.Linear`` layers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.out_features, mod.in_features)
            counts[key] = counts.get(key, 0) + 1
    return [(n, k, c) for (n, k), c in counts.items()]


def tune_shapes(shapes: list[tuple[int, int]], batches=(1,), config: EnergyTuneConfig | None = None,
                exhaustive: bool = False, counter=None, progress: bool = True) -> dict:
    """Energy-aware choices for ``x (m, k) @ W.T (n, k)`` at every ``(n, k)`` in ``shapes`` and ``m`` in ``batches``.

    Returns ``{"format_version", "gpu", "choices": {op: {"MxNxK": {"latency", "energy"}}}, "rows": [...]}``;
    with the guided search, ``latency`` is the fastest *measured* candidate. Needs CUDA and NVML."""
    from tqdm.auto import tqdm

    from ..kernels.energy_gemv import reference
    from .measure import EnergyUnavailableError, NVMLCounter, measure_op

    if not torch.cuda.is_available():
        raise EnergyUnavailableError("energy tuning measures on an NVIDIA GPU: no CUDA device here")
    cfg = config or EnergyTuneConfig()
    counter = counter if counter is not None else NVMLCounter()
    gpu = counter.name()
    prior = training_rows(gpu)
    table = {"format_version": FORMAT_VERSION, "gpu": gpu, "choices": {}, "rows": [],
             "settings": cfg.to_dict() | {"search": "exhaustive" if exhaustive else "model"}}
    jobs = [(m, n, k) for n, k in shapes for m in batches]
    for m, n, k in tqdm(jobs, desc="shapes", disable=not progress):
        t0 = time.perf_counter()
        op = op_for(m)
        spec = get_op(op)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        ref = reference(x, w).float()
        scale = ref.abs().max().item() or 1.0
        cands, feats = {}, {}
        for c in spec.candidates(m, n, k):
            try:
                err = (spec.run(c, x, w).float() - ref).abs().max().item() / scale
            except Exception as e:  # the compiler rejects a config (resources): not a candidate here
                log.info("skip %s at %s: %s", c.key, shape_key(m, n, k), e)
                continue
            if err < 2e-2:
                cands[c.key], feats[c.key] = c, spec.features(c, m, n, k)

        def measure(key: str) -> Measurement:
            r = measure_op(lambda: spec.run(cands[key], x, w), counter, window_s=cfg.window_s)
            return Measurement(key, r.joules_per_op, r.latency_s, r.noise_rel)

        if exhaustive:
            res = exhaustive_search(list(cands), measure, cfg.eps)
        else:
            res = model_search(list(cands), feats.__getitem__, measure, CostModel(prior), cfg)
        fastest = min(res.measured, key=lambda mm: mm.latency_s)
        table["choices"].setdefault(op, {})[shape_key(m, n, k)] = {"latency": fastest.key, "energy": res.choice.key}
        for mm in res.measured:
            table["rows"].append({"op": op, "shape": shape_key(m, n, k), "key": mm.key, "features": feats[mm.key],
                                  "joules": mm.joules, "latency_s": mm.latency_s, "noise_rel": mm.noise_rel})
        log.info("%s %s: %d of %d measured in %.1f s -> %s", op, shape_key(m, n, k), res.n_measured, len(cands),
                 time.perf_counter() - t0, res.choice.key)
    return table
