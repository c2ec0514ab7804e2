"""Tuned choices shipped as data, one JSON file per GPU name, and the dispatcher that reads them.

A table (``tables/<gpu slug>.json``, written by ``benchmarks/energy_autotune.py``) holds, per op and
shape, the latency-tuned and the energy-tuned candidate keys, plus the measured rows they came from; the
rows are also the cost model's cold-start training data. :func:`linear` runs ``x @ w.T`` with the
candidate the table names for the mode the user asks (``tune="energy"`` or ``HF_EFFICIENT_TUNE=energy``)
and falls back to cuBLAS when the GPU, op or shape is not in a table.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from .config import tune_mode
from .variants import Candidate, get_op, op_for

TABLE_DIR = Path(__file__).parent / "tables"
FORMAT_VERSION = 1


def slug(gpu_name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia_h200`` (the table's file name)."""
    s = re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_")
    if not s:
        raise ValueError(f"gpu_name must contain a letter or digit, got {gpu_name!r}")
    return s


def shape_key(m: int, n: int, k: int) -> str:
    return f"{m}x{n}x{k}"


def validate(table: dict, source: str = "table") -> dict:
    if table.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source}: format_version must be {FORMAT_VERSION}, got {table.get('format_version')!r}")
    for field in ("gpu", "choices", "rows"):
        if field not in table:
            raise ValueError(f"{source}: missing field {field!r}")
    for op, shapes in table["choices"].items():
        get_op(op)
        for shape, entry in shapes.items():
            for mode in ("latency", "energy"):
                if mode not in entry:
                    raise ValueError(f"{source}: choices[{op!r}][{shape!r}] lacks {mode!r}")
                Candidate.from_key(entry[mode])
    return table


@lru_cache(maxsize=None)
def load_table(gpu_name: str, table_dir: str | None = None) -> dict | None:
    """The shipped table for ``gpu_name`` or None when there is none."""
    path = Path(table_dir or TABLE_DIR) / f"{slug(gpu_name)}.json"
    if not path.exists():
        return None
    return validate(json.loads(path.read_text()), str(path))


def choice(op: str, m: int, n: int, k: int, mode: str, gpu_name: str, table_dir: str | None = None) -> Candidate | None:
    """The tuned candidate for ``op`` at ``(m, n, k)`` in ``mode`` (``latency``/``energy``), if tabled."""
    table = load_table(gpu_name, table_dir)
    if table is None:
        return None
    entry = table["choices"].get(op, {}).get(shape_key(m, n, k))
    return Candidate.from_key(entry[tune_mode(mode)]) if entry else None


def training_rows(gpu_name: str, table_dir: str | None = None) -> list[tuple[dict, float, float]]:
    """``(features, joules, latency_s)`` rows measured on ``gpu_name``: the cost model's cold start."""
    table = load_table(gpu_name, table_dir)
    if table is None:
        return []
    return [(r["features"], r["joules"], r["latency_s"]) for r in table["rows"]]


def linear(x: torch.Tensor, w: torch.Tensor, tune: str | None = None, table_dir: str | None = None) -> torch.Tensor:
    """``x @ w.T`` (``x`` (M, K) or (..., K), ``w`` (N, K)) by the tuned variant for this GPU and shape.

    ``tune``: ``"latency"`` or ``"energy"`` (default: ``$HF_EFFICIENT_TUNE``, else latency). Uses cuBLAS
    (``torch.nn.functional.linear``) off CUDA and where no table names a choice."""
    mode = tune_mode(tune)
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x has K={x.shape[-1]} but w has K={w.shape[-1]}")
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return torch.nn.functional.linear(x, w)
    x2 = x.reshape(-1, x.shape[-1])
    m, (n, k) = x2.shape[0], w.shape
    op = op_for(m)
    c = choice(op, m, n, k, mode, torch.cuda.get_device_name(x.device), table_dir)
    if c is None:
        return torch.nn.functional.linear(x, w)
    return get_op(op).run(c, x2, w).reshape(*x.shape[:-1], n)
