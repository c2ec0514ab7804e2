"""Energy tuner logic on the CPU: measurement against a simulated counter (the hardware boundary only),
the selection rule, the cost model and its online refit, the guided search, the Triton-hook ordering,
the variant registry and the shipped-table dispatcher."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from hf_efficient.energy import (Candidate, CostModel, EnergyMeter, EnergyTuneConfig, EnergyUnavailableError,
                                 Measurement, NVMLCounter, choose, exhaustive_search, get_op, kernel_features,
                                 measure_op, model_search, register_op, tune_mode)
from hf_efficient.energy.measure import EdgeSampler, power_between


# ---------------------------------------------------------------- measurement
class SimClock:
    """Virtual time that advances only when the simulated counter is read (one poll = ``dt`` seconds)."""

    def __init__(self, dt: float):
        self.t, self.dt, self.lock = 0.0, dt, threading.Lock()

    def __call__(self) -> float:
        return self.t


class SimCounter:
    """Test double of NVML's counter: reports the energy (``energy_j(t)``, joules since 0) of the last tick
    boundary, as a counter that updates every ``tick`` seconds does."""

    def __init__(self, clock: SimClock, energy_j, tick: float):
        self.clock, self.energy_j, self.tick = clock, energy_j, tick

    def read_mj(self) -> float:
        with self.clock.lock:
            self.clock.t += self.clock.dt
            return round(self.energy_j(math.floor(self.clock.t / self.tick) * self.tick) * 1e3, 3)

    def name(self) -> str:
        return "Simulated GPU"


def _step_power(idle_w: float, busy_w: float, t_busy: float):
    return lambda t: idle_w * min(t, t_busy) + busy_w * max(0.0, t - t_busy)


def _wait_until(clock: SimClock, t: float) -> None:
    import time

    while clock() < t:
        time.sleep(1e-5)  # hand the GIL to the sampler thread, whose polls move the virtual clock


def test_power_between_recovers_a_known_power_from_tick_edges():
    edges = [(0.1 * i + 0.003 * (i % 2), 1e6 + 250.0 * 100 * i) for i in range(30)]  # 250 W, jittered edges
    r = power_between(edges, 0.5, 2.5)
    assert r.ticks == 19
    # edge jitter 3 ms over a 1.9 s window bounds the error; the noise estimate must cover it
    assert abs(r.watts - 250.0) / 250.0 <= 2 * 0.003 / 1.9
    assert r.noise_rel > 0
    with pytest.raises(ValueError, match="counter edges"):
        power_between(edges, 0.51, 0.69)


@pytest.mark.parametrize("watts", [75.0, 640.0])
def test_energy_meter_on_simulated_counter(watts):
    clock = SimClock(dt=2e-4)
    counter = SimCounter(clock, _step_power(40.0, watts, 0.1), tick=0.02)
    sampler = EdgeSampler(counter, poll_s=1e-6, clock=clock)
    with sampler:
        _wait_until(clock, 0.4)
    r = power_between(sampler.edges, 0.12, 0.4)
    # edges are seen within one poll (dt) of the tick: error <= 2 dt / window; the idle phase is excluded
    assert abs(r.watts - watts) / watts <= 2 * 2e-4 / 0.24 + 1e-3


def test_energy_meter_context_manager_reports_block_energy():
    clock = SimClock(dt=2e-4)
    counter = SimCounter(clock, _step_power(300.0, 300.0, 0.0), tick=0.02)
    meter = EnergyMeter(counter, synchronize=lambda: None, poll_s=1e-6, clock=clock)
    with meter:
        _wait_until(clock, 0.3)
    assert meter.reading.watts == pytest.approx(300.0, rel=2 * 2e-4 / 0.25 + 1e-3)
    assert meter.joules == pytest.approx(300.0 * meter.seconds, rel=2e-3)


def test_nvml_absent_or_unusable_raises_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(EnergyUnavailableError, match="nvidia-ml-py"):
        NVMLCounter()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_measure_op_without_cuda_raises():
    with pytest.raises(EnergyUnavailableError, match="CUDA"):
        measure_op(lambda: None, counter=object())
    with pytest.raises(ValueError, match="window_s"):
        measure_op(lambda: None, counter=object(), window_s=0)


# ---------------------------------------------------------------- config and selection rule
@pytest.mark.parametrize("field,value", [("eps", -0.1), ("eps", 1.0), ("window_s", 0), ("budget_frac", 0),
                                         ("budget_frac", 1.5), ("batch", 0), ("min_measurements", 1.5),
                                         ("version", 2)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EnergyTuneConfig(**{field: value})


def test_config_budget_and_roundtrip():
    cfg = EnergyTuneConfig(budget_frac=0.2, min_measurements=3)
    assert [cfg.budget(n) for n in (2, 10, 35, 36)] == [2, 3, 7, 7]
    assert EnergyTuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        EnergyTuneConfig.from_dict({"epsilon": 1})


def test_tune_mode(monkeypatch):
    monkeypatch.delenv("HF_EFFICIENT_TUNE", raising=False)
    assert tune_mode() == "latency"
    monkeypatch.setenv("HF_EFFICIENT_TUNE", "energy")
    assert tune_mode() == "energy" and tune_mode("latency") == "latency"
    monkeypatch.setenv("HF_EFFICIENT_TUNE", "power")
    with pytest.raises(ValueError, match="HF_EFFICIENT_TUNE"):
        tune_mode()


M = Measurement
CHOOSE_CASES = [
    # name, measurements, eps, expected key, reason
    ("saving beyond noise", [M("fast", 1.00, 100e-6, .004), M("frugal", 0.85, 103e-6, .004)], 0.05, "frugal", "energy"),
    ("too slow for eps", [M("fast", 1.00, 100e-6, .004), M("frugal", 0.80, 106e-6, .004)], 0.05, "fast", "latency"),
    ("inside the noise", [M("fast", 1.00, 100e-6, .01), M("frugal", 0.98, 101e-6, .01)], 0.05, "fast", "latency"),
    ("eps zero", [M("fast", 1.00, 100e-6), M("frugal", 0.5, 100.1e-6)], 0.0, "fast", "latency"),
    ("fastest is frugal", [M("a", 0.9, 90e-6), M("b", 1.0, 95e-6)], 0.05, "a", "latency"),
    ("best of three", [M("a", 1.0, 100e-6), M("b", 0.9, 102e-6), M("c", 0.8, 104e-6)], 0.05, "c", "energy"),
]


@pytest.mark.parametrize("name,ms,eps,key,reason", CHOOSE_CASES, ids=[c[0] for c in CHOOSE_CASES])
def test_choose(name, ms, eps, key, reason):
    got, why = choose(ms, eps)
    assert (got.key, why) == (key, reason)


def test_choose_rejects_bad_input():
    with pytest.raises(ValueError, match="measured"):
        choose([])
    with pytest.raises(ValueError, match="eps"):
        choose([M("a", 1, 1)], eps=-1)


# ---------------------------------------------------------------- cost model and search on a synthetic GPU
def _synthetic_truth(f: dict) -> tuple[float, float]:
    """A made-up GPU: bandwidth use depends on the implementation, occupancy and tail; power on the impl.
    Deterministic, so search results are exactly reproducible."""
    bw = 4.3e12 * (0.80 + 0.12 * f["impl_dot"] + 0.15 * f["impl_library"] - 0.05 * f["impl_acc1d"]
                   - 0.02 * abs(f["log2_block_n"] - 4) - 0.03 * (f["num_warps"] == 8) * f["impl_acc2d"])
    lat = f["_bytes"] / bw * (1 + 0.2 * (f["tail"] - 1))
    watts = 690 - 120 * f["impl_library"] - 110 * f["impl_dot"] - 50 * f["impl_acc2d"] + 4 * f["log2_block_k"]
    return watts * lat, lat


def _space(n, k):
    spec = get_op("bf16_gemv")
    cands = {c.key: c for c in spec.candidates(1, n, k)}
    feats = {key: spec.features(c, 1, n, k) for key, c in cands.items()}
    truth = {key: Measurement(key, *_synthetic_truth(f), 0.004) for key, f in feats.items()}
    return feats, truth


def test_cost_model_prior_only_and_refit():
    feats, truth = _space(28672, 8192)
    model = CostModel()
    keys = list(feats)
    pri = model.predict([feats[k] for k in keys])
    assert all(j > 0 and t > 0 for j, t in pri) and model.refits == 0
    model.update([feats[k] for k in keys[:5]], [(truth[k].joules, truth[k].latency_s) for k in keys[:5]])
    assert model.refits == 1 and len(model.rows) == 5
    with pytest.raises(ValueError, match="> 0"):
        model.update([feats[keys[0]]], [(0.0, 1.0)])
    with pytest.raises(ValueError, match="length"):
        model.update([feats[keys[0]]], [])


def test_cost_model_transfers_across_shapes():
    """Trained on one shape's table, it predicts another shape's candidates: the prior alone is off by the
    implementation's efficiency (tens of %), the learned correction carries over to the new shape."""
    import statistics

    fa, ta = _space(28672, 8192)
    fb, tb = _space(8192, 28672)
    keys = list(fb)
    true = [(tb[k].joules, tb[k].latency_s) for k in keys]

    def median_err(model, i):
        pred = model.predict([fb[k] for k in keys])
        return statistics.median(abs(p[i] / t[i] - 1) for p, t in zip(pred, true))

    trained = CostModel([(fa[k], ta[k].joules, ta[k].latency_s) for k in fa])
    for i in (0, 1):
        assert median_err(trained, i) < 0.05 < median_err(CostModel(), i)
    pred = trained.predict([fb[k] for k in keys])
    top4 = sorted(range(len(keys)), key=lambda i: pred[i][0])[:4]
    assert min(tb[keys[i]].joules for i in top4) == min(t[0] for t in true)


@pytest.mark.parametrize("prior", [True, False], ids=["prior", "cold"])
def test_model_search_reaches_exhaustive_optimum_with_few_measurements(prior):
    fa, ta = _space(28672, 8192)
    fb, tb = _space(8192, 28672)
    cfg = EnergyTuneConfig()
    calls = []

    def measure(k):
        calls.append(k)
        return tb[k]

    rows = [(fa[k], ta[k].joules, ta[k].latency_s) for k in fa] if prior else []
    res = model_search(list(fb), fb.__getitem__, measure, CostModel(rows), cfg)
    ex = exhaustive_search(list(fb), tb.__getitem__, cfg.eps)
    assert len(calls) == len(set(calls)) == res.n_measured <= cfg.budget(len(fb))
    assert res.n_measured <= 0.2 * len(fb)
    if prior:  # the target: within 2 % of the exhaustive optimum
        assert res.choice.joules <= ex.choice.joules * 1.02
    else:  # no prior: the search must still beat the latency-optimal choice it started from
        fastest = min(tb.values(), key=lambda m: m.latency_s)
        assert res.choice.joules <= fastest.joules


def test_model_search_rejects_empty():
    with pytest.raises(ValueError, match="keys"):
        model_search([], dict, dict, CostModel())


def test_kernel_features_errors_and_fields():
    f = kernel_features("acc2d", 1, 28672, 8192, {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4},
                        {"n_regs": 96, "n_spills": 0, "shared": 0})
    assert f["log2_programs"] == pytest.approx(math.log2(28672 / 16)) and 0 < f["occupancy"] <= 1
    with pytest.raises(ValueError, match="m, n, k"):
        kernel_features("acc1d", 0, 1, 1, {})


# ---------------------------------------------------------------- Triton autotuner hooks (ordering logic)
def test_autotune_hooks_prune_and_order_like_choose():
    from hf_efficient.energy.autotune import EnergyAutotuneHooks, EnergyScore, _Round

    fb, tb = _space(8192, 28672)
    keys = [k for k in fb if k != "library"]
    fa, ta = _space(28672, 8192)
    model = CostModel([(fa[k], ta[k].joules, ta[k].latency_s) for k in fa])
    hooks = EnergyAutotuneHooks(lambda c, args: fb[c], model, top_k=4)
    kept = hooks.prune(keys, {})
    assert len(kept) == 4 and hooks.last_pruned == kept
    # Triton's own selection: min over {config: [score, q20, q80]}
    rnd = _Round(EnergyTuneConfig())
    timings = {k: [EnergyScore(tb[k].latency_s * 1e3, tb[k].joules, 0.004, rnd), 0.0, 0.0] for k in keys}
    timings["broken"] = [float("inf")] * 3  # a config that failed to compile
    best = min(timings, key=timings.get)
    want, _ = choose([Measurement(k, tb[k].joules, tb[k].latency_s * 1e3, 0.004) for k in keys])
    assert best == want.key
    with pytest.raises(ValueError, match="top_k"):
        EnergyAutotuneHooks(top_k=0)
    with pytest.raises(ValueError, match="features"):
        EnergyAutotuneHooks(model=model)


# ---------------------------------------------------------------- registry and tables
def test_candidate_keys_roundtrip_and_errors():
    for op in ("bf16_gemv", "bf16_gemm"):
        for c in get_op(op).candidates(1, 4096, 4096):
            assert Candidate.from_key(c.key) == c
    with pytest.raises(ValueError, match="bad candidate key"):
        Candidate.from_key("acc1d:BLOCK_N=x")
    with pytest.raises(ValueError, match="bad candidate key"):
        Candidate.from_key("acc1d:COLOR=3")
    with pytest.raises(ValueError, match="unknown op"):
        get_op("fp8_gemv")
    with pytest.raises(ValueError, match="already registered"):
        register_op(get_op("bf16_gemv"))


def _table(tmp_path, gpu="Simulated GPU", **over):
    from hf_efficient.energy.tables import load_table, slug

    t = {"format_version": 1, "gpu": gpu, "rows": [],
         "choices": {"bf16_gemv": {"1x48x64": {"latency": "library",
                                               "energy": "acc2d:BLOCK_K=256,BLOCK_N=16,num_stages=1,num_warps=4"}}}}
    t.update(over)
    (tmp_path / f"{slug(gpu)}.json").write_text(json.dumps(t))
    load_table.cache_clear()
    return str(tmp_path)


def test_tables_lookup_and_validation(tmp_path):
    from hf_efficient.energy.tables import choice, load_table, slug, training_rows

    d = _table(tmp_path)
    assert slug("NVIDIA H200") == "nvidia_h200"
    assert choice("bf16_gemv", 1, 48, 64, "energy", "Simulated GPU", d).impl == "acc2d"
    assert choice("bf16_gemv", 1, 48, 64, "latency", "Simulated GPU", d).impl == "library"
    assert choice("bf16_gemv", 1, 64, 64, "energy", "Simulated GPU", d) is None
    assert choice("bf16_gemv", 1, 48, 64, "energy", "Other GPU", d) is None
    assert training_rows("Simulated GPU", d) == []
    with pytest.raises(ValueError, match="format_version"):
        load_table("Simulated GPU", _table(tmp_path, format_version=9))
    with pytest.raises(ValueError, match="lacks 'energy'"):
        load_table("Simulated GPU", _table(tmp_path, choices={"bf16_gemv": {"1x1x1": {"latency": "library"}}}))
    load_table.cache_clear()


def test_shipped_tables_are_valid():
    from hf_efficient.energy.tables import TABLE_DIR, validate

    for p in TABLE_DIR.glob("*.json"):
        t = validate(json.loads(p.read_text()), str(p))
        assert t["rows"], f"{p}: no measured rows for the cost model's cold start"


def test_linear_dispatch_falls_back_on_cpu(monkeypatch):
    from hf_efficient.energy import linear

    x, w = torch.randn(3, 5, 64), torch.randn(48, 64)
    monkeypatch.setenv("HF_EFFICIENT_TUNE", "energy")
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="K="):
        linear(x, torch.randn(48, 32))
    with pytest.raises(ValueError, match="tune"):
        linear(x, w, tune="fast")
