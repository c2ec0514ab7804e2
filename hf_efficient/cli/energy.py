"""``hf-efficient energy-tune``: energy-aware kernel choices for the linear shapes of a model (NVIDIA GPU)."""
from __future__ import annotations

from .common import CliError, check_writable_file

HELP = "energy-aware kernel choices for a model's linear shapes (GPU + NVML)"


def configure(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local Hugging Face model directory (omitted: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch", default="1", help="comma-separated M (tokens per call) to tune, e.g. 1,16")
    p.add_argument("--eps", type=float, default=0.05, help="latency slack over the fastest candidate")
    p.add_argument("--window", type=float, default=2.0, help="seconds of energy-counter ticks per measurement")
    p.add_argument("--exhaustive", action="store_true", help="measure every candidate (default: cost-model search)")
    p.add_argument("--list", action="store_true", help="only list the model's linear shapes (no GPU needed)")
    p.add_argument("--out", default="energy_table.json", help="table JSON (copy to hf_efficient/energy/tables/"
                                                                "<gpu>.json to ship it)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw energy vs latency per shape")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _batches(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--batch must be comma-separated positive integers, got {text!r}")
    if not out or min(out) < 1:
        raise CliError(f"--batch must be comma-separated positive integers, got {text!r}")
    return out


def run(args) -> int:
    import json

    from transformers import AutoConfig

    from ..energy import EnergyTuneConfig, EnergyUnavailableError
    from ..energy.tune import linear_shapes, tune_shapes
    from ..models import resolve_model_path

    batches = _batches(args.batch)
    out = check_writable_file(args.out)
    check_writable_file(args.plot)
    try:
        cfg = EnergyTuneConfig(eps=args.eps, window_s=args.window)
    except ValueError as e:
        raise CliError(str(e))
    shapes = linear_shapes(AutoConfig.from_pretrained(resolve_model_path(args.model)))
    for n, k, count in shapes:
        print(f"linear {n} x {k}: {count} layer(s)")
    if args.list:
        return 0
    try:
        table = tune_shapes([(n, k) for n, k, _ in shapes], batches, cfg, args.exhaustive,
                            progress=not args.no_progress)
    except EnergyUnavailableError as e:
        raise CliError(str(e))
    out.write_text(json.dumps(table, indent=1) + "\n")
    for op, entries in table["choices"].items():
        for shape, ch in entries.items():
            print(f"{op} {shape}: latency -> {ch['latency']}, energy -> {ch['energy']}")
    if args.plot:
        from ..energy.plot import plot_table

        plot_table(table, args.plot)
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
