"""The stitched GEMV results table: one run per cell, ratios only within that run, logs of cut-off runs parsed."""
import json

from benchmarks.quant_gemv_summary import summarize


def _run(path, rows, code=""):
    env = {"device": "GPU", "date": "2026-11-30 10:00:00"}
    path.write_text(json.dumps({"environment": env, "settings": {"code": code}, "rows": rows}))
    return path


def _rows(n, k, m, ours, bf16, tiny=None):
    out = [dict(N=n, K=k, M=m, impl="ours_int4_asym_g128", us=ours, pct_copy_bw=10.0),
           dict(N=n, K=k, M=m, impl="cublas_bf16", us=bf16, pct_copy_bw=80.0)]
    if tiny:
        out.append(dict(N=n, K=k, M=m, impl="tinygemm_int4_g128", us=tiny, pct_copy_bw=40.0))
    return out


def test_last_run_wins_per_cell_and_ratios_stay_within_a_run(tmp_path):
    a = _run(tmp_path / "a.json", _rows(64, 64, 1, ours=10.0, bf16=20.0, tiny=5.0) + _rows(64, 64, 16, 30.0, 15.0))
    b = _run(tmp_path / "b.json", _rows(64, 64, 1, ours=8.0, bf16=12.0), code="intermediate code")
    log = tmp_path / "c.log"
    log.write_text("device copy bandwidth: 4 TB/s\n"
                   "N=64  K=64  M=16  impl=ours_int4_asym_g128  us=25  weight_GB_s=1  pct_copy_bw=12  x=1\n"
                   "N=64  K=64  M=16  impl=gemlite_int4_g128  us=50  weight_GB_s=1  pct_copy_bw=6\n"
                   "N=64  K=64  M=4  impl=ours_int4_asym_g128  us=9  weight_GB_s=1  pct_copy_bw=12\n")
    rows = {r["M"]: r for r in summarize([a, b, log])}
    assert set(rows) == {1, 16}  # the M=4 cell has no baseline: dropped
    assert rows[1]["ours_us"] == 8.0 and rows[1]["x_vs_bf16"] == 1.5 and "tinygemm_us" not in rows[1]
    assert "intermediate" in rows[1]["source"]
    assert rows[16]["x_vs_gemlite"] == 2.0 and "bf16_us" not in rows[16] and rows[16]["source"] == "c.log (log)"
