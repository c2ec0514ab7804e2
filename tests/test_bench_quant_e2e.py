"""CPU checks of benchmarks.quant_e2e's bookkeeping (the timings themselves need CUDA)."""
import logging
import os
from pathlib import Path

import pytest

from benchmarks.common import run_child
from benchmarks.quant_e2e import _add_ratios, _RecompileLimitHits

REPO = Path(__file__).resolve().parents[1]


def test_ratios_pair_rows_of_the_same_path_and_depth():
    rows = [{"model": "bf16", "tokens_per_s": 100.0}, {"model": "tinygemm", "tokens_per_s": 150.0},
            {"model": "nf4_asym", "tokens_per_s": 120.0},
            {"model": "hf-bf16", "tokens_per_s": 40.0, "layers": 8},
            {"model": "hf-bf16", "tokens_per_s": 10.0, "layers": 32},
            {"model": "hf-nf4_asym", "tokens_per_s": 50.0, "layers": 8},
            {"model": "hf-nf4_asym", "tokens_per_s": 25.0, "layers": 32},
            {"model": "hf-fp4_asym", "tokens_per_s": 30.0, "layers": 16}]
    _add_ratios(rows)
    got = {(r["model"], r.get("layers")): (r["x_vs_bf16"], r["x_vs_tinygemm"]) for r in rows}
    assert got[("nf4_asym", None)] == pytest.approx((1.2, 0.8))
    assert got[("hf-nf4_asym", 8)] == (1.25, None)
    assert got[("hf-nf4_asym", 32)] == (2.5, None)
    assert got[("hf-fp4_asym", 16)] == (None, None)  # no bf16 row of that depth: no ratio rather than a wrong one


def test_recompile_limit_warnings_are_counted():
    hits = _RecompileLimitHits()
    log = logging.getLogger("test_bench_quant_e2e")
    log.addHandler(hits)
    try:
        log.warning("torch._dynamo hit config.%s (%s)", "recompile_limit", 8)
        log.warning("something else")
    finally:
        log.removeHandler(hits)
    assert hits.hits == 1


def test_run_child_returns_the_childs_result_or_none(tmp_path, monkeypatch):
    (tmp_path / "hfe_probe_child.py").write_text(
        "import os, sys\nfrom benchmarks.common import child_result\n"
        "print('noise')\nchild_result({'args': sys.argv[1:], 'x': 1.5, 'probe': os.environ.get('HFE_PROBE')})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("HFE_PROBE", raising=False)
    assert run_child("hfe_probe_child", "a", "b") == {"args": ["a", "b"], "x": 1.5, "probe": None}
    assert run_child("hfe_probe_child", env={"HFE_PROBE": "on"})["probe"] == "on"  # added to, not replacing, ours
    assert "HFE_PROBE" not in os.environ
    assert run_child("hfe_no_such_module") is None  # the failure is reported, not raised
    assert run_child("json.tool", "--help") is None  # it ran, but handed back no result
