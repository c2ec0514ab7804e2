"""The main job's report: row status (broken rows flagged), legend, markdown, JSON and the plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

# A row whose perplexity exceeds the fp32 row's by these factors is flagged beside its numbers.
DEGRADED, BROKEN = 1.25, 10.0

COLUMNS = (
    ("PPL", "perplexity on held-out Shakespeare plays (sliding window; lower is better)"),
    ("prefill tok/s", "prompt tokens processed per second in one forward (median of repeats)"),
    ("decode tok/s", "greedy tokens generated per second on the KV cache (median of repeats)"),
    ("peak MiB", "peak resident memory of the row's own fresh process: load, quantization and evaluation"),
    ("row MiB", "that peak minus the process before the model was loaded (interpreter, torch, tokenizer)"),
    ("weights MiB", "bytes of the tensors save_pretrained writes (packed codes + scales for quantized rows)"),
    ("kernel", "which implementation served the quantized linear layers, by share of calls (measured)"),
    ("status", "ok, or how far perplexity fell behind the fp32 row"),
)
KERNELS = {
    "lut": "C++ T-MAC table-lookup kernels on the CPU (csrc/lut; no dequantization)",
    "cuda": "Triton quantized GEMV/GEMM on the GPU (hf_efficient/kernels/)",
    "reference (dequantize + matmul)": "plain torch: dequantize the layer's weights, then a float matmul",
    "float (torch matmul)": "an ordinary float model",
}


def status(row: dict, baseline_ppl: float | None, expected_broken: str | None = None) -> str:
    """``expected_broken``: the row's stated reason for being far worse than fp32 (see ``DemoRow``)."""
    ppl = row.get("ppl")
    if row.get("error"):
        return "FAILED: " + row["error"]
    if ppl is None or not math.isfinite(ppl):
        return "BROKEN: perplexity is not finite"
    if not baseline_ppl or row["name"] == "fp32":
        return "ok"
    ratio = ppl / baseline_ppl
    if ratio > BROKEN and expected_broken:
        return f"BROKEN (expected): perplexity {ratio:,.0f}x the fp32 row's. {expected_broken}"
    if ratio > BROKEN:
        return (f"BROKEN: perplexity {ratio:,.0f}x the fp32 row's; this format/recipe destroys the model "
                f"(round-to-nearest, no calibration); the sample below is not meaningful")
    if ratio > DEGRADED:
        return f"degraded: perplexity +{100 * (ratio - 1):.0f} % vs fp32"
    return f"ok ({100 * (ratio - 1):+.1f} % PPL vs fp32)"


def _num(v, fmt):
    return "" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    lines = ["| row | PPL | prefill tok/s | decode tok/s | peak MiB | row MiB | weights MiB | kernel | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        x = r.get("extra", {})
        lines.append("| " + " | ".join([
            r["name"], _num(r.get("ppl"), "{:,.2f}"), _num(r.get("prefill_tok_s"), "{:.1f}"),
            _num(r.get("decode_tok_s"), "{:.1f}"), _num(r.get("peak_mem_mb"), "{:.0f}"),
            _num(x.get("row_mem_mb"), "{:.0f}"), _num(r.get("size_mb"), "{:.1f}"), x.get("kernel", ""),
            r.get("status", "")]) + " |")
    return "\n".join(lines)


def legend(rows: list[dict], descriptions: dict[str, str]) -> str:
    lines = ["Rows:"] + [f"  {r['name']:<15} {descriptions.get(r['name'], '')}" for r in rows]
    lines += ["Columns:"] + [f"  {c:<15} {d}" for c, d in COLUMNS]
    seen = {k for r in rows for k in r.get("extra", {}).get("kernel_calls", {})}
    seen |= {"float (torch matmul)"} if any(not r.get("extra", {}).get("kernel_calls") for r in rows) else set()
    lines += ["Kernels:"] + [f"  {k:<15} {KERNELS.get(k, k)}" for k in sorted(seen)]
    return "\n".join(lines)


def markdown(rows: list[dict], settings: dict, descriptions: dict[str, str], env: dict) -> str:
    samples = "\n".join(f"- **{r['name']}**{' (broken row)' if r['status'].startswith('BROKEN') else ''}: "
                        f"{(r.get('sample') or '').strip()!r}" for r in rows)
    return (f"# hf-efficient demo\n\nModel `{Path(settings['model']).name}` on {env.get('device')} "
            f"({settings['threads'] or 'default'} threads), {env.get('date')}; torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}.\nPerplexity over {settings['eval_tokens']} held-out tokens, "
            f"context {settings['context']}; speed: prompt {settings['prompt_len']} tokens, "
            f"{settings['new_tokens']} decoded, median of {settings['repeats']}.\n\n{table(rows)}\n\n"
            f"```\n{legend(rows, descriptions)}\n```\n\n## Greedy samples\n\n{samples}\n\n"
            f"![perplexity vs size vs decode speed](demo.png)\n")


def plot(rows: list[dict], path: Path) -> str | None:
    """Perplexity (log) against weight size, marker area ~ decode tok/s. Returns None, or why no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    pts = [r for r in rows if r.get("ppl") and r.get("size_mb") and math.isfinite(r["ppl"])]
    if not pts:
        return "no row has both perplexity and size: no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(r.get("decode_tok_s") or 1 for r in pts)
    for r in pts:
        broken = r["status"].startswith("BROKEN")
        area = 60 + 600 * (r.get("decode_tok_s") or 0) / top
        ax.scatter(r["size_mb"], r["ppl"], s=area, alpha=0.6, color="tab:red" if broken else "tab:blue")
        label = f"{r['name']}\n{r.get('decode_tok_s') or 0:.0f} tok/s" + (" (broken)" if broken else "")
        ax.annotate(label, (r["size_mb"], r["ppl"]), textcoords="offset points", xytext=(8, 4), fontsize=8)
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("perplexity (log scale; lower is better)")
    ax.set_yscale("log")
    ax.set_title("hf-efficient demo: perplexity vs size; marker area = decode tokens/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(out_dir: Path, rows: list[dict], settings: dict, descriptions: dict[str, str], env: dict) -> list[Path]:
    """demo.json, demo.md and demo.png in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps({"environment": env, "settings": settings, "rows": rows},
                                                  indent=1) + "\n")
    (out_dir / "demo.md").write_text(markdown(rows, settings, descriptions, env))
    written = [out_dir / "demo.json", out_dir / "demo.md"]
    why = plot(rows, out_dir / "demo.png")
    if why is None:
        written.append(out_dir / "demo.png")
    else:
        print(f"note: {why}")
    return written
