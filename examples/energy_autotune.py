"""Energy-aware choice of a GEMV variant: measure, search with the cost model, dispatch.

Run: ``python examples/energy_autotune.py`` (NVIDIA GPU + ``pip install 'hf-efficient[energy]'``: it measures
real joules). Without a GPU it runs the same search on a made-up table, to show the API.
"""
from __future__ import annotations

import torch

from hf_efficient.energy import (CostModel, EnergyTuneConfig, EnergyUnavailableError, Measurement, exhaustive_search,
                                 get_op, linear, measure_op, model_search)
from hf_efficient.energy.tables import training_rows

N, K = 28672, 8192
cfg = EnergyTuneConfig(eps=0.05, window_s=1.0)
spec = get_op("bf16_gemv")
cands = {c.key: c for c in spec.candidates(1, N, K)}

if torch.cuda.is_available():
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    gpu = torch.cuda.get_device_name()
    for c in cands.values():  # compile each once so the features carry registers / shared memory
        try:
            spec.run(c, x, w)
        except Exception:
            pass

    def measure(key: str) -> Measurement:
        r = measure_op(lambda: spec.run(cands[key], x, w), window_s=cfg.window_s)
        return Measurement(key, r.joules_per_op, r.latency_s, r.noise_rel)
else:
    gpu = "NVIDIA H200"

    def measure(key: str) -> Measurement:  # stand-in numbers: a CPU has no NVML counter
        f = spec.features(cands[key], 1, N, K)
        t = f["_bytes"] / 4e12 * (1.3 - 0.2 * f["impl_dot"] - 0.25 * f["impl_library"])
        return Measurement(key, t * (650 - 100 * f["impl_dot"] - 90 * f["impl_library"]), t, 0.004)

feats = {k: spec.features(c, 1, N, K) for k, c in cands.items()}
# Cold start from the rows shipped for this GPU (measured on our machines), then refit online.
model = CostModel(training_rows(gpu))
res = model_search(list(cands), feats.__getitem__, measure, model, cfg, progress=True)
print(f"guided search: {res.n_measured}/{len(cands)} measured -> {res.choice.key} "
      f"({res.choice.joules * 1e3:.3f} mJ, {res.choice.latency_s * 1e6:.1f} us, by {res.reason})")
if not torch.cuda.is_available():
    ex = exhaustive_search(list(cands), measure, cfg.eps)
    print(f"exhaustive:    {ex.n_measured} measured -> {ex.choice.key} ({ex.choice.joules * 1e3:.3f} mJ)")
    print("(made-up numbers: no GPU here)")
else:
    try:
        y = linear(x, w, tune="energy")  # the shipped table's energy choice for this GPU and shape
        print("dispatcher output", tuple(y.shape))
    except EnergyUnavailableError as e:
        print(e)
