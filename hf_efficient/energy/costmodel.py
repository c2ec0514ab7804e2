"""The energy/latency cost model: kernel and launch features -> predicted joules and seconds per call.

Predictions are an analytic roofline prior times a learned correction. The prior is the time to move
the op's bytes at the GPU's bandwidth (or do its FLOPs at peak), stretched by the last partial wave of
programs, at a nominal power; gradient-boosted trees (scikit-learn) learn ``log(measured / prior)`` for
energy and latency. Normalising by the roofline is what lets a model trained on one shape rank the
candidates of another: the trees see launch and kernel features, not absolute sizes.

Training data are rows ``(features, joules, latency_s)``: a cold start uses the rows shipped in the
tuned tables (measured on our GPUs), and :meth:`CostModel.update` refits after each batch of new
measurements, weighting them above the prior (the seed paper's online update). Nothing is pickled: the
shipped form of the model is its training table (JSON), refit on load in milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

FEATURES = (
    "impl_acc1d", "impl_acc2d", "impl_dot", "impl_gemm", "impl_library",
    "log2_block_m", "log2_block_n", "log2_block_k", "num_warps", "num_stages",
    "log2_programs", "waves", "tail", "log2_bytes_per_program", "log2_intensity", "log2_m",
    "n_regs", "n_spills", "shared_kb", "occupancy",
)


@dataclass(frozen=True)
class GPUSpec:
    """Nominal figures for the prior (vendor datasheet / measured copy bandwidth); only ratios matter."""

    name: str = "NVIDIA H200"
    sms: int = 132
    bandwidth: float = 4.3e12   # bytes/s, measured device copy on the H200
    peak_flops: float = 7.9e14  # bf16 dense, measured 8192^3 matmul on the H200
    watts: float = 600.0
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    threads_per_sm: int = 2048


H200 = GPUSpec()


def occupancy(num_warps: int, n_regs: int | None, shared: int | None, gpu: GPUSpec = H200) -> float:
    """Fraction of the SM's thread slots filled, from the limits by threads, registers and shared memory."""
    threads = num_warps * 32
    blocks = min(32, gpu.threads_per_sm // threads)
    if n_regs:
        blocks = min(blocks, gpu.regs_per_sm // (max(n_regs, 1) * threads))
    if shared:
        blocks = min(blocks, gpu.smem_per_sm // shared)
    return max(blocks, 0) * threads / gpu.threads_per_sm


def kernel_features(impl: str, m: int, n: int, k: int, config: dict, meta: dict | None = None,
                    gpu: GPUSpec = H200, elem_bytes: int = 2) -> dict:
    """The model's input for running ``impl`` with launch ``config`` on ``y = x (m, k) @ W.T (n, k)``.

    ``impl``: ``acc1d``/``acc2d``/``dot``/``gemm`` (ours) or ``library`` (cuBLAS); ``meta``: the compiled
    kernel's ``n_regs``/``n_spills``/``shared`` when known (-1 stands for unknown)."""
    if min(m, n, k) < 1:
        raise ValueError(f"m, n, k must be >= 1, got {m}, {n}, {k}")
    meta = meta or {}
    bm = config.get("BLOCK_M", 16 if impl == "dot" else 1)
    bn, bk = config.get("BLOCK_N", 128), config.get("BLOCK_K", 64)
    warps, stages = config.get("num_warps", 4), config.get("num_stages", 1)
    if impl in ("acc1d", "acc2d"):
        programs = math.ceil(n / bn) * m
    elif impl == "dot":
        programs = math.ceil(n / bn)
    elif impl == "gemm":
        programs = math.ceil(m / bm) * math.ceil(n / bn)
    else:
        programs = max(gpu.sms, math.ceil(n / 128))
    total = op_bytes(m, n, k, elem_bytes)
    waves = programs / gpu.sms
    regs, shared = meta.get("n_regs"), meta.get("shared")
    occ = occupancy(warps, regs, shared, gpu) if impl != "library" else -1.0
    return {
        "impl_acc1d": float(impl == "acc1d"), "impl_acc2d": float(impl == "acc2d"), "impl_dot": float(impl == "dot"),
        "impl_gemm": float(impl == "gemm"), "impl_library": float(impl == "library"),
        "log2_block_m": math.log2(bm), "log2_block_n": math.log2(bn), "log2_block_k": math.log2(bk),
        "num_warps": float(warps), "num_stages": float(stages),
        "log2_programs": math.log2(programs), "waves": waves, "tail": math.ceil(waves) / waves,
        "log2_bytes_per_program": math.log2(total / programs),
        "log2_intensity": math.log2(2 * m * n * k / total), "log2_m": math.log2(m),
        "n_regs": float(regs if regs is not None else -1), "n_spills": float(meta.get("n_spills", -1)),
        "shared_kb": float(shared / 1024 if shared is not None else -1), "occupancy": occ,
        # not model inputs: the prior's size terms
        "_bytes": float(total), "_flops": float(2 * m * n * k),
    }


def op_bytes(m: int, n: int, k: int, elem_bytes: int = 2) -> int:
    """Compulsory DRAM traffic of ``x (m, k) @ W.T (n, k) -> (m, n)``."""
    return (n * k + m * k + m * n) * elem_bytes


def prior(feat: dict, gpu: GPUSpec = H200) -> tuple[float, float]:
    """Roofline (joules, seconds) of one call: the floor the learned correction multiplies."""
    seconds = max(feat["_bytes"] / gpu.bandwidth, feat["_flops"] / gpu.peak_flops)
    seconds *= min(feat["tail"], 2.0) ** 0.5  # a half-empty last wave costs, but less than its full share
    return seconds * gpu.watts, seconds


class CostModel:
    """Predicts ``(joules, latency_s)`` per call from :func:`kernel_features` dicts.

    ``prior_rows``: ``[(features, joules, latency_s), ...]`` (e.g. from :func:`hf_efficient.energy.tables
    .training_rows`) fit at construction; :meth:`update` adds measured rows with weight ``new_weight`` and
    refits. With fewer than ``min_fit`` rows the prediction is the roofline prior alone."""

    def __init__(self, prior_rows: Sequence[tuple[dict, float, float]] = (), gpu: GPUSpec = H200,
                 new_weight: float = 4.0, min_fit: int = 3, n_estimators: int = 120, max_depth: int = 3,
                 learning_rate: float = 0.1, seed: int = 0):
        if new_weight <= 0:
            raise ValueError(f"new_weight must be > 0, got {new_weight}")
        self.gpu, self.new_weight, self.min_fit = gpu, new_weight, min_fit
        self._params = dict(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                            random_state=seed, min_samples_leaf=1)
        self.rows: list[tuple[dict, float, float, float]] = [(f, j, t, 1.0) for f, j, t in prior_rows]
        self._models = None
        self.refits = 0
        self._fit()

    @staticmethod
    def _x(feats: Sequence[dict]):
        import numpy as np

        return np.array([[float(f.get(name, -1.0)) for name in FEATURES] for f in feats], dtype=np.float64)

    def _fit(self) -> None:
        if len(self.rows) < self.min_fit:
            self._models = None
            return
        import numpy as np
        from sklearn.ensemble import GradientBoostingRegressor

        x = self._x([r[0] for r in self.rows])
        priors = [prior(r[0], self.gpu) for r in self.rows]
        y_j = np.log([r[1] / p[0] for r, p in zip(self.rows, priors)])
        y_t = np.log([r[2] / p[1] for r, p in zip(self.rows, priors)])
        w = np.array([r[3] for r in self.rows])
        self._models = tuple(GradientBoostingRegressor(**self._params).fit(x, y, sample_weight=w) for y in (y_j, y_t))
        self.refits += 1

    def update(self, feats: Sequence[dict], measured: Sequence[tuple[float, float]]) -> None:
        """Add measured ``(joules, latency_s)`` for ``feats`` and refit (the online update)."""
        if len(feats) != len(measured):
            raise ValueError(f"feats and measured differ in length: {len(feats)} vs {len(measured)}")
        for f, (j, t) in zip(feats, measured):
            if not (j > 0 and t > 0):
                raise ValueError(f"measured joules and latency must be > 0, got {j}, {t}")
            self.rows.append((f, j, t, self.new_weight))
        self._fit()

    def predict(self, feats: Sequence[dict]) -> list[tuple[float, float]]:
        """Predicted ``(joules, latency_s)`` per feature dict."""
        feats = list(feats)
        if not feats:
            return []
        priors = [prior(f, self.gpu) for f in feats]
        if self._models is None:
            return priors
        import numpy as np

        x = self._x(feats)
        cj, ct = (np.exp(m.predict(x)) for m in self._models)
        return [(p[0] * a, p[1] * b) for p, a, b in zip(priors, cj, ct)]
