"""Quality table for AFPQ / MoFQ: held-out perplexity of the embedded model under every weight format.

Rows: fp32; RTN and GPTQ for INT-asym, INT-sym, FP-sym, NF-sym, AFPQ FP-asym, AFPQ NF-asym at 4 and 3 bits; MoFQ W4
vs pure INT4/FP4 and MoFQ W8A8 vs pure INT8/FP8 W8A8. Every quantized model starts from the same float
weights; GPTQ rows share the same calibration windows (training plays); PPL is scored on the same
held-out tokens. Results are rewritten after each row, so an interrupted run keeps what it measured.

Run: ``python -m benchmarks.quality_afpq_mofq [--max-tokens 4096] [--groups 128,64] [--out DIR]``.
Generalisation table: ``--heldout plays,news,generated --calib-source mixed --name quality_heldout`` scores
every row on the held-out plays, a news text (another domain) and text the float model wrote from prompts
it never saw in calibration (``hf_efficient.data.heldout_ids``); one ``ppl_<set>`` column each.
Split the rows over processes (``--threads 1`` each) with ``--shard k/n --out DIR_k``, or over invocations one
after another with ``--only REGEX --out DIR_k``, and join them with ``--merge DIR_0 ... DIR_n-1 --out DIR`` (same
``--name``; ``--extend`` applies to the joined rows); each part scores the same fp32 baseline, and the join refuses
parts whose fp32 rows or settings (other than the command) differ. ``--device cuda`` works but is no faster: that
loop is launch-bound on a GPU.
``--extend quality_afpq_mofq`` also writes this run's rows into that result file, tagged with ``table`` = this
run's ``--name`` and named ``<row> [<name>]`` (the rows of an earlier run with that tag are replaced), so a
table made with other settings sits next to the main one without being mistaken for it.
Perplexity is scored on QuantLinear's reference path (dequantized weights, float activations): the table
compares formats, not a CPU engine's rounding of activations.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results
from hf_efficient.data import heldout_ids
from hf_efficient.evaluation import perplexity, state_dict_bytes
from hf_efficient.models import load_model
from hf_efficient.quantization.afpq import AFPQConfig
from hf_efficient.quantization.api import calibration_windows, quantize_model
from hf_efficient.quantization.linear import reference_only
from hf_efficient.quantization.mofq import MoFQConfig

NOTE = ("The embedded weights are dequantized from Q4_1 (w = d*q + m per block of 32 along in_features): INT4 "
        "with a float minimum at g32 reproduces them exactly, so this model favours INT formats at 4 bits; "
        "3-bit rows are where no format is exact.")


def single_format_rows(bits: int, group: int) -> list[tuple[str, dict]]:
    kinds = [("int", False, "INT{b}-asym"), ("int", True, "INT{b}-sym"), ("fp", True, "FP{b}-sym"),
             ("nf", True, "NF{b}-sym"),
             ("fp", False, "AFPQ FP{b}-asym"), ("nf", False, "AFPQ NF{b}-asym")]
    out = []
    for algo in ("rtn", "gptq"):
        for fmt, sym, label in kinds:
            out.append((f"{label.format(b=bits)} g{group} {algo.upper()}",
                        dict(cls=AFPQConfig, bits=bits, fmt=fmt, asymmetric=not sym, group_size=group,
                             algorithm=algo)))
    return out


def mofq_w4_rows(group: int) -> list[tuple[str, dict]]:
    return [(f"{name} g{group} RTN", dict(cls=MoFQConfig, bits=4, group_size=group, candidates=cands))
            for name, cands in (("MoFQ W4", ["int4_sym", "fp4_sym"]), ("pure INT4-sym", ["int4_sym"]),
                                ("pure FP4-sym", ["fp4_sym"]))]


def mofq_asym_rows(group: int) -> list[tuple[str, dict]]:
    """MoFQ over every 4-bit format (INT/FP/NF, asym two-scale or zero point, and sym), by layer output error
    (the default: mean squared) and, RTN, by the relative one (each token's error over its output norm)."""
    return [(f"MoFQ-asym W4 g{group} {algo.upper()}", dict(cls=MoFQConfig, bits=4, group_size=group, algorithm=algo))
            for algo in ("rtn", "gptq")] + \
        [(f"MoFQ-asym W4 relative g{group} RTN", dict(cls=MoFQConfig, bits=4, group_size=group,
                                                       selection="relative_output_error"))]


def mofq_w8a8_rows() -> list[tuple[str, dict]]:
    return [(f"{name} per-channel RTN", dict(cls=MoFQConfig, bits=8, group_size=-1, candidates=cands, act_bits=8))
            for name, cands in (("MoFQ W8A8", ["int8_sym", "fp8_sym"]), ("pure INT8 W8A8", ["int8_sym"]),
                                ("pure FP8 W8A8", ["fp8_sym"]))]


COLUMNS = ["name", "ppl", "delta_ppl", "size_mb", "quant_s"]
HELDOUT = ("plays", "news", "generated")


def plan_rows(groups: list[int], bits: list[int]) -> list[tuple[str, dict | None]]:
    single = [r for g in groups for b in bits for r in single_format_rows(b, g)]
    # Cheap rows first (RTN, MoFQ), GPTQ last: an interrupted run on a busy CPU still has a full RTN table.
    asym = [r for g in groups for r in mofq_asym_rows(g)]
    return [("fp32", None)] + [r for r in single if r[0].endswith("RTN")] + \
        [r for r in asym if r[0].endswith("RTN")] + [r for g in groups for r in mofq_w4_rows(g)] + mofq_w8a8_rows() + \
        [r for r in single if r[0].endswith("GPTQ")] + [r for r in asym if r[0].endswith("GPTQ")]


def merge(dirs: list[str], out: str | None, name: str = "quality_afpq_mofq") -> tuple[list[dict], dict]:
    """Join the parts' results: one fp32 row (they must agree), the other rows in plan order."""
    payloads = [json.loads((Path(d) / f"{name}.json").read_text()) for d in dirs]
    fp32 = [r for p in payloads for r in p["rows"] if r["name"] == "fp32"]
    if not fp32 or max(r["ppl"] for r in fp32) - min(r["ppl"] for r in fp32) > 1e-3 * fp32[0]["ppl"]:
        raise SystemExit(f"shards disagree on (or lack) the fp32 baseline: {[r['ppl'] for r in fp32]}")
    same = [{k: v for k, v in p["settings"].items() if k != "command"} for p in payloads]
    if any(s != same[0] for s in same):
        raise SystemExit(f"the parts were run with different settings or code: {same}")
    settings = dict(payloads[0]["settings"])
    groups = sorted({int(m[1]) for p in payloads for r in p["rows"] if (m := re.search(r" g(\d+) ", r["name"]))},
                    reverse=True) or [128]
    order = {name: i for i, (name, _) in enumerate(plan_rows(groups, [4, 3]))}
    unique = {}
    for r in (r for p in payloads for r in p["rows"] if r["name"] != "fp32"):
        if r["name"] in unique:
            raise SystemExit(f"row {r['name']!r} appears in more than one shard")
        unique[r["name"]] = r
    rows = [fp32[0]] + sorted(unique.values(), key=lambda r: order.get(r["name"], len(order)))
    settings["command"] = " ; ".join(p["settings"]["command"] for p in payloads) + \
        " ; python -m benchmarks.quality_afpq_mofq --merge " + " ".join(dirs)
    write_results(name, rows, settings, out, columns=result_columns(settings["eval_split"].split(",")))
    return rows, settings


def result_columns(heldout: list[str]) -> list[str]:
    return COLUMNS if heldout == ["plays"] else ["name"] + [f"ppl_{h}" for h in heldout] + ["size_mb", "quant_s"]


def code_version() -> str:
    """The last commit of the code the rows run (the library, its kernels included, and this script; commits
    elsewhere do not change it), "-dirty" when the working tree differs from it."""
    code = ["--", "hf_efficient", "benchmarks/quality_afpq_mofq.py"]
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("log", "-1", "--format=%h", *code) + ("-dirty" if git("status", "--porcelain", *code) else "")


def extend(target: str, table: str, rows: list[dict], settings: dict, out: str | None) -> None:
    """Put ``rows`` (tagged ``table``) into result file ``target``, replacing that table's earlier rows."""
    path = Path(out or RESULTS_DIR) / f"{target}.json"
    payload = json.loads(path.read_text())
    kept = [r for r in payload["rows"] if r.get("table") != table]
    tagged = [{**r, "name": f"{r['name']} [{table}]", "table": table} for r in rows]
    merged = dict(payload["settings"])
    merged.setdefault("tables", {})[table] = settings
    cols = list(dict.fromkeys(COLUMNS + [k for r in tagged for k in r if k.startswith("ppl_")] + ["table"]))
    write_results(target, kept + tagged, merged, out, columns=cols)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--groups", default="128", help="comma-separated group sizes (default 128)")
    ap.add_argument("--bits", default="4,3", help="comma-separated bit widths of the single-format rows")
    ap.add_argument("--only", default=None, help="run only rows whose name matches this regular expression")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; TF32 stays off)")
    ap.add_argument("--shard", default="0/1", help="k/n: run every n-th row starting at k (fp32 always)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="join shard results and exit")
    ap.add_argument("--heldout", default="plays", help=f"comma-separated held-out texts among {HELDOUT}")
    ap.add_argument("--calib-source", default="plays", help="calibration text (hf_efficient.data.calibration_windows)")
    ap.add_argument("--damp", type=float, default=AFPQConfig().damp,
                    help="GPTQ dampening, a fraction of the Hessian's mean diagonal (default: the config default)")
    ap.add_argument("--name", default="quality_afpq_mofq", help="result file name")
    ap.add_argument("--extend", default=None, metavar="NAME", help="also add this run's rows to result file NAME")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.merge:
        rows, settings = merge(args.merge, args.out, args.name)
        if args.extend:
            extend(args.extend, args.name, rows, settings, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.shard.split("/"))
    if not 0 <= k < n:
        raise SystemExit(f"--shard {args.shard}: expected k/n with 0 <= k < n")
    torch.backends.cuda.matmul.allow_tf32 = False  # the table compares formats, not TF32 rounding

    base, tok = load_model(None, dtype=torch.float32, device=args.device)
    heldout = args.heldout.split(",")
    evals = {h: heldout_ids(tok, h, args.max_tokens, base) for h in heldout}
    ids = evals[heldout[0]]
    windows = calibration_windows(tok, args.calib_samples, args.calib_seqlen, seed=0, source=args.calib_source,
                                  model=base)
    columns = result_columns(heldout)
    plan = plan_rows([int(g) for g in args.groups.split(",")], [int(b) for b in args.bits.split(",")])
    if args.only:
        plan = [(name, s) for name, s in plan if name == "fp32" or re.search(args.only, name)]
    plan = plan[:1] + plan[1:][k::n]

    settings = {"model": "SmolLM2-135M-Instruct (embedded, dequantized Q4_1)", "device": args.device,
                "eval_tokens": int(ids.numel()) if len(evals) == 1 else {h: int(e.numel()) for h, e in evals.items()},
                "code": code_version(),
                "context": args.context, "stride": args.context // 2, "calib_windows": args.calib_samples,
                "calib_seqlen": args.calib_seqlen, "calib_split": args.calib_source, "damp": args.damp,
                "eval_split": ",".join(heldout),
                "scale_dtype": "float16", "modules_to_not_convert": ["lm_head"], "note": NOTE,
                "command": "python -m benchmarks.quality_afpq_mofq " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows, fp32_ppl = [], None
    for name, spec in plan:
        t0 = time.time()
        if spec is None:
            model, extra = base, {}
        else:
            spec = dict(spec)
            cfg = spec.pop("cls")(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                                  calib_source=args.calib_source, damp=args.damp, **spec)
            model = copy.deepcopy(base)
            quantize_model(model, cfg, windows if cfg.needs_calibration() else None, progress=False)
            extra = {"config": cfg.to_dict()}
            if isinstance(cfg, MoFQConfig):
                extra["summary"] = cfg.summary()
        qtime = time.time() - t0
        with reference_only():
            ppls = {f"ppl_{h}": perplexity(model, e, context=args.context, progress=False) for h, e in evals.items()}
        ppl = ppls[f"ppl_{heldout[0]}"]
        fp32_ppl = fp32_ppl or ppl
        r = {"name": name, "ppl": ppl, "delta_ppl": ppl - fp32_ppl, **ppls, "size_mb": state_dict_bytes(model) / 2**20,
             "quant_s": qtime, **extra}
        rows.append(r)
        print(f"{name:40s} " + " ".join(f"{k}={v:8.3f}" for k, v in ppls.items()) +
              f"  size={r['size_mb']:.1f} MiB  {qtime:.0f} s  {extra.get('summary', '')}", flush=True)
        write_results(args.name, rows, settings, args.out, columns=columns)
        if args.extend:
            extend(args.extend, args.name, rows, settings, args.out)
        if model is not base:
            del model


if __name__ == "__main__":
    main()
