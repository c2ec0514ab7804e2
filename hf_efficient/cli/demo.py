"""``hf-efficient demo``: the main job. Evaluates every demo row (the fp32 baseline, then one row per
feature) on the embedded model, each in a fresh process so its peak memory is its own, and writes a
report folder (demo.json, demo.md, demo.png).
"""
from __future__ import annotations

from .common import CliError, add_eval_args, add_model_args, add_speed_args, check_writable_dir, setup_runtime
from .demo_rows import BY_NAME, ROWS

HELP = "the main job: evaluate every demo row (fp32 baseline and each feature) and write a report"


def configure(p) -> None:
    add_model_args(p)
    add_eval_args(p)
    add_speed_args(p)
    p.add_argument("--rows", default=None, help="comma-separated demo rows (None: all), from: "
                   + "; ".join(f"{r.name} ({r.description})" for r in ROWS))
    p.add_argument("--out", default="demo_report", help="report folder (demo.json, demo.md, demo.png)")
    p.add_argument("--same-process", action="store_true",
                   help="run every row in this process (faster start; peak memory then includes earlier rows)")
    # Keeps the whole job within ~10 minutes on a 2-core CPU. One thread: #21 states the speed targets at 1 thread,
    # and on a shared small machine a row's second thread measures the neighbours more than the row.
    p.set_defaults(max_tokens=4096, new_tokens=16, repeats=2, threads=1)


def run(args) -> int:
    import json
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    names = args.rows.split(",") if args.rows else [r.name for r in ROWS if r.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise CliError(f"unknown demo row(s) {unknown}; available: {list(BY_NAME)}")
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create report folder {out_dir}: {e.strerror or e}")
    check_writable_dir(out_dir)
    device = setup_runtime(args)
    from ..evaluation import environment
    from ..models import resolve_model_path
    from . import demo_report
    from .demo_worker import run_row

    base = resolve_model_path(args.model)  # converts the embedded model once, before any row starts
    descriptions = {r.name: r.description for r in ROWS}
    print(f"hf-efficient demo: {len(names)} rows on {base.name} ({device}); report folder {out_dir.resolve()}")
    print(demo_report.legend([{"name": n} for n in names], descriptions).split("Columns:")[0].rstrip())
    rows, t_start = [], time.perf_counter()
    for i, name in enumerate(names, 1):
        tag = f"row {i}/{len(names)} {name}"
        print(f"\n== {tag}: {descriptions[name]}", flush=True)
        settings = dict(row=name, tag=tag, base=str(base), device=device, dtype=args.dtype, threads=args.threads,
                        max_tokens=args.max_tokens, context=args.context, stride=args.stride,
                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                        progress=not args.no_progress)
        t0 = time.perf_counter()
        try:
            if args.same_process:
                row = run_row(settings)
            else:
                row = _run_in_subprocess(settings, tempfile, json, subprocess, os)
        except Exception as e:  # one failed row must not hide the others: report it in its place
            row = {"name": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300], "extra": {}}
        row.setdefault("extra", {})["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"== {tag}: done in {row['extra']['seconds']:.0f} s"
              + (f" (PPL {row['ppl']:,.2f})" if row.get("ppl") is not None else f" ({row.get('error')})"),
              flush=True)
    base_ppl = next((r.get("ppl") for r in rows if r["name"] == "fp32"), None)
    for r in rows:
        r["status"] = demo_report.status(r, base_ppl, BY_NAME[r["name"]].expected_broken)
    env = environment()
    settings = {"model": str(base), "device": device, "threads": args.threads, "context": args.context,
                "eval_tokens": next((r["extra"].get("eval_tokens") for r in rows if r.get("extra")), None),
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "total_s": time.perf_counter() - t_start}
    print(f"\nhf-efficient demo on {base.name} ({device}); PPL over {settings['eval_tokens']} held-out tokens, "
          f"context {args.context}; {settings['total_s'] / 60:.1f} min\n")
    print(demo_report.table(rows))
    print("\n" + demo_report.legend(rows, descriptions))
    for r in rows:
        flag = "  [BROKEN ROW: not meaningful]" if r["status"].startswith("BROKEN") else ""
        if r.get("sample") is not None:
            print(f"\n[{r['name']}] sample{flag}: {r['sample']}")
    written = demo_report.write(out_dir, rows, settings, descriptions, env)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "settings": settings, "rows": rows}, indent=1))
        written.append(Path(args.json))
    print("\nreport written: " + ", ".join(str(p) for p in written))
    return 1 if any(r.get("error") for r in rows) else 0


def _run_in_subprocess(settings, tempfile, json, subprocess, os) -> dict:
    from .demo_worker import worker_command

    with tempfile.TemporaryDirectory(prefix="hfe-demo-") as tmp:
        s_path, o_path = os.path.join(tmp, "settings.json"), os.path.join(tmp, "row.json")
        with open(s_path, "w") as f:
            json.dump(settings, f)
        # The child's output (phase lines, progress bars) goes straight to this terminal.
        r = subprocess.run(worker_command(settings["device"]) + [s_path, o_path])
        if r.returncode != 0 or not os.path.exists(o_path):
            raise RuntimeError(f"the row's process exited with code {r.returncode} (its error is printed above)")
        with open(o_path) as f:
            return json.load(f)
