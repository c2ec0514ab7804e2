"""The one definition of the autotune config spaces of the quantized matmul kernels.

A space is plain data (a list of dicts of meta-parameters plus ``num_warps``/``num_stages``), keyed by
shape through :data:`KEYS`, so other tools (the energy autotuner) can iterate the same candidates.
:func:`autotune` turns a space into ``triton.autotune`` on a GPU; under ``TRITON_INTERPRET=1`` (CPU tests)
it picks the first valid config instead of timing (the interpreter's timings mean nothing).

Validity rules (:func:`valid`): a K tile never straddles a quantization group (``GROUP % BLOCK_K == 0``,
the kernels load one scale row per tile), and the tiles of 3-bit weights cover whole words of both planes.
"""
from __future__ import annotations

import os

import triton

_W, _S = "num_warps", "num_stages"

SPACES: dict[str, list[dict]] = {
    # M == 1: a [BLOCK_K, BLOCK_N] dequant-multiply-reduce; each program covers ITERS * BLOCK_K of K and
    # the K splits meet in an fp32 atomic add. Wide N tiles read long coalesced rows; small ITERS gives
    # many programs (bytes in flight) for short K.
    "gemv": [
        dict(BLOCK_N=128, BLOCK_K=128, ITERS=1, **{_W: 4, _S: 1}),
        dict(BLOCK_N=128, BLOCK_K=64, ITERS=2, **{_W: 4, _S: 1}),
        dict(BLOCK_N=256, BLOCK_K=64, ITERS=1, **{_W: 4, _S: 1}),
        dict(BLOCK_N=64, BLOCK_K=128, ITERS=2, **{_W: 4, _S: 1}),
        dict(BLOCK_N=256, BLOCK_K=32, ITERS=2, **{_W: 4, _S: 1}),
    ],
    # M >= 2: dequantize a [BLOCK_K, BLOCK_N] tile to the activation dtype and tl.dot it; SPLIT_K > 1
    # for small M, where the M x N tile grid alone cannot fill the GPU.
    "gemm": [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, **{_W: 4, _S: 3}),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, **{_W: 4, _S: 3}),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, **{_W: 8, _S: 3}),
        # group size 32 needs 32-deep K tiles
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32, SPLIT_K=8, **{_W: 4, _S: 4}),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, SPLIT_K=1, **{_W: 4, _S: 4}),
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
    "gemv": ["N", "K", "GROUP", "BITS", "MODE", "DECODE"],
    "gemm": ["M_BUCKET", "N", "K", "GROUP", "BITS", "MODE", "DECODE"],
    "lut": ["M_BUCKET", "N", "K", "GROUP", "N_TERMS"],
}

# Zeroed before and restored after each timing run: split-K kernels accumulate into these atomically.
ACCUMULATES: dict[str, list[str]] = {"gemv": ["out_ptr"], "gemm": ["out_ptr"], "lut": []}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def valid(name: str, cfg: dict, args: dict) -> bool:
    """Whether ``cfg`` is usable for the call ``args`` (kernel argument names -> values)."""
    group = args["GROUP"]
    if "BLOCK_K" in cfg:
        bk = cfg["BLOCK_K"]
        if group % bk or bk < (32 if args["BITS"] == 3 else 32 // args["BITS"]):
            return False
    if name == "gemm" and "M" in args:
        m = args["M"]
        # No M tile more than twice the batch: the extra rows are pure waste.
        if cfg["BLOCK_M"] > max(16, 2 * triton.next_power_of_2(m)):
            return False
    if name == "lut" and cfg["BLOCK_M"] > triton.next_power_of_2(args["M"]):
        return False
    return True


def space(name: str) -> list[dict]:
    """The candidate configs of kernel ``name`` as plain dicts (copies)."""
    return [dict(c) for c in SPACES[name]]


def configs(name: str) -> list[triton.Config]:
    out = []
    for c in space(name):
        w, s = c.pop(_W), c.pop(_S)
        out.append(triton.Config(c, num_warps=w, num_stages=s))
    return out


def _prune(name: str):
    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        ok = [c for c in cfgs if valid(name, c.kwargs, args)]
        if not ok:
            raise ValueError(f"{name}: no kernel config fits GROUP={args['GROUP']} BITS={args['BITS']}")
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
                raise ValueError(f"{self.name}: no kernel config fits GROUP={named['GROUP']} BITS={named['BITS']}")
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
