"""Energy vs latency of every measured candidate, one panel per op and shape, choices marked (matplotlib)."""
from __future__ import annotations

COLORS = {"acc1d": "tab:blue", "acc2d": "tab:orange", "dot": "tab:green", "gemm": "tab:purple", "library": "tab:red"}


def plot_table(table: dict, png: str) -> None:
    """Draw ``table`` (the shipped-table format: ``rows`` and ``choices``) to ``png``."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'hf-efficient[energy]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["op"], r["shape"]) for r in table["rows"]))
    if not panels:
        raise ValueError("table has no measured rows to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (op, shape) in zip(axes[0], panels):
        pts = {r["key"]: r for r in table["rows"] if r["op"] == op and r["shape"] == shape}
        for impl, col in COLORS.items():
            sel = [r for k, r in pts.items() if k.split(":")[0] == impl]
            if sel:
                ax.scatter([r["latency_s"] * 1e6 for r in sel], [r["joules"] * 1e3 for r in sel], s=18, c=col,
                           label="cuBLAS" if impl == "library" else impl)
        chosen = table.get("choices", {}).get(op, {}).get(shape, {})
        for mode, mark in (("latency", "s"), ("energy", "*")):
            p = pts.get(chosen.get(mode))
            if p:
                ax.scatter([p["latency_s"] * 1e6], [p["joules"] * 1e3], s=170, facecolors="none", edgecolors="k",
                           marker=mark, label=f"{mode} choice")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op} {shape} ({table.get('gpu', '?')})", fontsize=9)
        ax.set_xlabel("latency per call (µs)")
        ax.set_ylabel("energy per call (mJ)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
