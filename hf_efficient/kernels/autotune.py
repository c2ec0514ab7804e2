"""The one definition of the autotune config spaces of the quantized matmul kernels.

A space is plain data (a list of dicts of meta-parameters plus ``num_warps``/``num_stages``), keyed by
shape through :data:`KEYS`, so other tools (the energy autotuner) can iterate the same candidates.
:func:`autotune` turns a space into ``triton.autotune`` on a GPU; under ``TRITON_INTERPRET=1`` (CPU tests)
it picks the first valid config instead of timing (the interpreter's timings mean nothing).

Validity rules (:func:`valid`): GEMV register budget (``BLOCK_M * BLOCK_N * BLOCK_C * W`` fp32 partial sums
per step, at most 32 per thread; the prefetching configs only for M <= 2), GEMM M tiles no more than twice the
batch and split-K only up to M = 64, LUT M tiles within the batch.
"""
from __future__ import annotations

import os

import triton

_W, _S = "num_warps", "num_stages"

SPACES: dict[str, list[dict]] = {
    # M <= 8: each program streams BLOCK_C 32-code chunks of BLOCK_N rows per step (one 128-bit load per
    # row and chunk at 4 bits) over 1/SPLIT_K of K; splits meet in the last-arriver epilogue. Narrow tiles
    # with more splits keep enough loads in flight on short K / small N; wide ones for long rows.
    "gemv": [
        dict(BLOCK_N=64, BLOCK_C=8, SPLIT_K=4, PREFETCH=0, **{_W: 4, _S: 1}),
        dict(BLOCK_N=32, BLOCK_C=8, SPLIT_K=8, PREFETCH=0, **{_W: 4, _S: 3}),
        dict(BLOCK_N=128, BLOCK_C=4, SPLIT_K=2, PREFETCH=0, **{_W: 4, _S: 3}),
        dict(BLOCK_N=16, BLOCK_C=4, SPLIT_K=8, PREFETCH=0, **{_W: 4, _S: 1}),  # fits M = 8 at 8 bits
        # Many small programs: at M = 1 the four above launch 256-512 programs on 4096 rows, 2-4 per SM, too few
        # to keep DRAM busy; more programs alone did not help on the H200 (docs/gpu_kernels.md).
        dict(BLOCK_N=32, BLOCK_C=8, SPLIT_K=16, PREFETCH=0, **{_W: 4, _S: 2}),
        dict(BLOCK_N=64, BLOCK_C=8, SPLIT_K=16, PREFETCH=0, **{_W: 4, _S: 2}),
        dict(BLOCK_N=16, BLOCK_C=16, SPLIT_K=32, PREFETCH=0, **{_W: 4, _S: 2}),
        dict(BLOCK_N=64, BLOCK_C=16, SPLIT_K=8, PREFETCH=0, **{_W: 8, _S: 2}),
        # One- and two-warp programs: the H200 profile (ncu) of the 4-warp ones showed low occupancy and the L1
        # busy (docs/gpu_kernels.md); small programs keep 4 rows per thread (R=4 x reuse), more resident per SM.
        dict(BLOCK_N=32, BLOCK_C=4, SPLIT_K=16, PREFETCH=0, **{_W: 1, _S: 1}),
        dict(BLOCK_N=64, BLOCK_C=4, SPLIT_K=16, PREFETCH=0, **{_W: 2, _S: 1}),
        # Register double-buffering: the next K step's weights are in flight during this step's arithmetic
        # (Triton's num_stages pipelines only loads that feed tl.dot; these loop loads were not pipelined).
        dict(BLOCK_N=64, BLOCK_C=8, SPLIT_K=16, PREFETCH=1, **{_W: 4, _S: 1}),
        dict(BLOCK_N=32, BLOCK_C=8, SPLIT_K=16, PREFETCH=1, **{_W: 4, _S: 1}),
        dict(BLOCK_N=16, BLOCK_C=16, SPLIT_K=32, PREFETCH=1, **{_W: 4, _S: 1}),
    ],
    # M > 8: decode a [BLOCK_N, BLOCK_C * 32] tile to the activation dtype and tl.dot it; SPLIT_K > 1 for
    # small M, where the M x N tile grid alone cannot fill the GPU.
    "gemm": [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_C=4, SPLIT_K=4, **{_W: 4, _S: 3}),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_C=4, SPLIT_K=2, **{_W: 4, _S: 3}),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_C=2, SPLIT_K=1, **{_W: 8, _S: 3}),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_C=4, SPLIT_K=8, **{_W: 4, _S: 3}),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_C=2, SPLIT_K=16, **{_W: 4, _S: 4}),
    ],
    # LUT mpGEMM: one quantization group per K step; BLOCK_M rows share each decoded parity pattern.
    "lut": [
        dict(BLOCK_M=1, BLOCK_N=128, **{_W: 4, _S: 1}),
        dict(BLOCK_M=2, BLOCK_N=64, **{_W: 4, _S: 1}),
        dict(BLOCK_M=4, BLOCK_N=64, **{_W: 4, _S: 1}),
        dict(BLOCK_M=8, BLOCK_N=32, **{_W: 4, _S: 1}),
    ],
}

# Arguments whose values select a tuned config (besides the tensor dtypes Triton adds itself).
KEYS: dict[str, list[str]] = {
    "gemv": ["M_BUCKET", "N", "K", "GROUP", "BITS", "MODE", "DECODE"],
    "gemm": ["M_BUCKET", "N", "K", "GROUP", "BITS", "MODE", "DECODE"],
    "lut": ["M_BUCKET", "N", "K", "GROUP", "N_TERMS"],
}

# Zeroed before and restored after each timing run: split-K kernels accumulate into these atomically.
# (None: the split-K epilogue needs no zeroed output, and the arrival counters reset themselves.)
ACCUMULATES: dict[str, list[str]] = {"gemv": [], "gemm": [], "lut": []}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def valid(name: str, cfg: dict, args: dict) -> bool:
    """Whether ``cfg`` is usable for the call ``args`` (kernel argument names -> values)."""
    if name == "gemv":
        w = 2 if args["BITS"] == 3 else args["BITS"]
        threads = 32 * cfg[_W]  # required: a default here once let the autotuner run configs max_split excluded
        # PREFETCH holds a second weight tile in registers: only where the batch's partial sums leave room
        return (args.get("BLOCK_M", 1) * cfg["BLOCK_N"] * cfg["BLOCK_C"] * w <= 32 * threads
                and (not cfg.get("PREFETCH") or args.get("BLOCK_M", 1) <= 2))
    m = args["M"]
    if name == "gemm":
        # No M tile more than twice the batch: the extra rows are pure waste. Split-K only for small M: a
        # prefill-sized M fills the GPU with tiles alone, and its split workspace (SPLIT_K x M x N fp32) would
        # be hundreds of MB.
        return (cfg["BLOCK_M"] <= max(16, 2 * triton.next_power_of_2(m))
                and (cfg.get("SPLIT_K", 1) == 1 or m <= GEMM_SPLIT_MAX_M))
    return cfg["BLOCK_M"] <= triton.next_power_of_2(m)


GEMM_SPLIT_MAX_M = 64


def max_split(name: str, args: dict) -> int:
    """Largest SPLIT_K among the configs valid for the call ``args`` (sizes the split-K workspace before the
    autotuner picks one)."""
    return max((c.get("SPLIT_K", 1) for c in SPACES[name] if valid(name, c, args)), default=1)


def space(name: str) -> list[dict]:
    """The candidate configs of kernel ``name`` as plain dicts (copies)."""
    return [dict(c) for c in SPACES[name]]


def configs(name: str) -> list[triton.Config]:
    out = []
    for c in space(name):
        w, s = c.pop(_W), c.pop(_S)
        out.append(triton.Config(c, num_warps=w, num_stages=s))
    return out


def as_dict(cfg: triton.Config) -> dict:
    """A ``triton.Config`` as the plain dict of :data:`SPACES` (its meta-parameters plus warps and stages)."""
    return {**cfg.kwargs, _W: cfg.num_warps, _S: cfg.num_stages}


def _prune(name: str):
    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        ok = [c for c in cfgs if valid(name, as_dict(c), args)]
        if not ok:
            raise ValueError(f"{name}: no kernel config fits BITS={args['BITS']} M={args.get('M')}")
        # The split-K workspace is sized by max_split before the launch: a config with more splits would write
        # past it (into whatever the allocator placed next) while the autotuner times it.
        split = max_split(name, args)
        if any(c.kwargs.get("SPLIT_K", 1) > split for c in ok):
            raise RuntimeError(f"{name}: autotune candidates exceed the split-K workspace ({split} splits)")
        return ok
    return prune


class _FirstValid:
    """Interpreter stand-in for ``triton.autotune``: launch with the first valid config."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            cfg = next((c for c in space(self.name) if valid(self.name, c, named)), None)
            if cfg is None:
                raise ValueError(f"{self.name}: no kernel config fits BITS={named['BITS']} M={named.get('M')}")
            meta = {k: v for k, v in cfg.items() if k not in (_W, _S)}
            g = grid({**named, **meta}) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **meta)
        return launch


def autotune(name: str):
    """Decorator: ``@autotune("gemv")`` above ``@triton.jit``."""
    def wrap(fn):
        if interpreting():
            return _FirstValid(name, fn)
        acc = ACCUMULATES[name]
        return triton.autotune(configs(name), key=KEYS[name], prune_configs_by={"early_config_prune": _prune(name)},
                               reset_to_zero=acc or None, restore_value=acc or None, warmup=5, rep=20)(fn)
    return wrap


def fixed(fn, name: str, cfg: dict):
    """Launch helper with one explicit config (tests and benchmarks of a single candidate)."""
    def launcher(grid):
        meta = {k: v for k, v in cfg.items() if k not in (_W, _S)}
        extra = {} if interpreting() else {_W: cfg.get(_W, 4), _S: cfg.get(_S, 1)}
        base = fn.fn if isinstance(fn, (_FirstValid, triton.runtime.Autotuner)) else fn
        def launch(*args, **kwargs):
            named = {**dict(zip(base.arg_names, args)), **kwargs, **meta}
            g = grid(named) if callable(grid) else grid
            return base[g](*args, **kwargs, **meta, **extra)
        return launch
    return launcher
