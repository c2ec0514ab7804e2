"""One table of INT4 g128 results over all shapes and batches, gathered from several ``quant_gemv`` runs.

Run: ``python -m benchmarks.quant_gemv_summary [--out DIR] RUN ...`` where each RUN is a results file of
``benchmarks/quant_gemv.py`` (``.json``, or the ``.log`` it prints, for a run cut off before it wrote JSON). No
GPU needed. For each (N, K, M) the row comes from the LAST run given that has ours and at least one baseline
there; every ratio compares figures of that one run (a device call's budget never held all 24 cells, so the
table is stitched per cell, never across runs within a cell). Writes ``quant_gemv_summary.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BASELINES = {"cublas_bf16": "bf16", "tinygemm_int4_g128": "tinygemm", "gemlite_int4_g128": "gemlite"}
OURS = "ours_int4_asym_g128"


def load(path: Path) -> tuple[list[dict], dict]:
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        return d["rows"], {**d["environment"], **d["settings"]}
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("N="):
            continue
        r = dict(re.findall(r"(\w+)=(\S+)", line))
        rows.append({"N": int(r["N"]), "K": int(r["K"]), "M": int(r["M"]), "impl": r["impl"], "us": float(r["us"]),
                     "pct_copy_bw": float(r["pct_copy_bw"])})
    return rows, {}


def summarize(paths: list[Path]) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for p in paths:
        rows, meta = load(p)
        by: dict[tuple, dict] = {}
        for r in rows:
            by.setdefault((r["N"], r["K"], r["M"]), {})[r["impl"]] = r
        for key, impls in by.items():
            if OURS not in impls or not any(b in impls for b in BASELINES):
                continue
            ours = impls[OURS]
            row = {"N": key[0], "K": key[1], "M": key[2], "ours_us": ours["us"], "ours_pct_copy_bw": ours["pct_copy_bw"]}
            for impl, short in BASELINES.items():
                if impl in impls:
                    row[f"{short}_us"] = impls[impl]["us"]
                    row[f"x_vs_{short}"] = impls[impl]["us"] / ours["us"]
            row["source"] = p.name + (f" ({meta['device']}, {meta['date'][:10]})" if meta else " (log)")
            if "intermediate" in meta.get("code", ""):
                row["source"] += " [intermediate code, see its settings]"
            cells[key] = row
    return [cells[k] for k in sorted(cells, key=lambda k: (k[2], k[0] * k[1], k[0]))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rows = summarize(args.runs)
    cols = ["N", "K", "M", "ours_us", "ours_pct_copy_bw", "bf16_us", "tinygemm_us", "gemlite_us", "x_vs_bf16",
            "x_vs_tinygemm", "x_vs_gemlite", "source"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# quant_gemv_summary", "", "INT4 asym g128, bf16 activations; x_vs_* = baseline time / ours (> 1: ours "
             "faster), both from the run named in `source`.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "-")) for c in cols) + " |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_gemv_summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "quant_gemv_summary.json").write_text(json.dumps({"sources": [p.name for p in args.runs],
                                                                  "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
