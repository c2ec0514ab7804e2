"""The foundation's CLI subcommands (``eval``, ``bench``, ``demo``) and the demo's fp32 baseline row.

Heavy imports (transformers, datasets) happen inside the functions so ``import hf_efficient`` and
``hf-efficient --help`` stay fast.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from . import registry

DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """An error the CLI reports as one line and exit code 2."""


def check_writable_file(path: str | None) -> Path | None:
    """Fail before any work if ``path``'s folder does not exist or cannot be written."""
    if path is None:
        return None
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"output folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".hfe-write-test-"):
            pass
    except OSError as e:
        raise CliError(f"cannot write to output folder {parent}: {e.strerror or e}")
    return p


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the embedded "
                                                  "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights/activation dtype (default float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=positive_int, default=2048, help="perplexity window in tokens (default %(default)s)")
    p.add_argument("--stride", type=positive_int, default=None, help="window step (default context/2)")
    p.add_argument("--max-tokens", type=positive_int, default=8192,
                   help="held-out tokens to score (default %(default)s; the eval plays hold ~290k)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens for prefill (default %(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="decoded tokens (default %(default)s)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, median reported (default %(default)s)")


def setup_runtime(args) -> str:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device} requested but CUDA is not available")
    return device


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _report(results, args, settings) -> None:
    from .evaluation import format_table, write_json

    print(format_table(results))
    for r in results:
        if r.sample:
            print(f"\n[{r.name}] sample: {r.sample}")
    if args.json:
        write_json(results, args.json, settings)
        print(f"\nwrote {args.json}")


def run_eval(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    from .data import token_ids
    from .evaluation import evaluate
    from .models import load_model

    model, tok = load_model(args.model, dtype=_torch_dtype(args.dtype), device=device)
    ids = token_ids(tok, "eval", args.max_tokens)
    res = evaluate(model, tok, args.model or "embedded-fp32", ids, context=args.context, stride=args.stride,
                   new_tokens=0, progress=not args.no_progress)
    _report([res], args, {"context": args.context, "stride": args.stride, "tokens": ids.numel()})
    return 0


def run_bench(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    from .evaluation import PeakMemory, EvalResult, measure_speed, state_dict_bytes
    from .models import load_model

    model, _ = load_model(args.model, dtype=_torch_dtype(args.dtype), device=device)
    with PeakMemory(device) as mem:
        speed = measure_speed(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                              repeats=args.repeats)
    res = EvalResult(name=args.model or "embedded", peak_mem_mb=mem.peak_bytes / 2**20,
                     size_mb=state_dict_bytes(model) / 2**20, **speed)
    _report([res], args, vars(args))
    return 0


def run_demo(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    from tqdm.auto import tqdm

    from .data import token_ids
    from .evaluation import evaluate
    from .models import resolve_model_path

    rows = registry.REGISTRY.demo_rows
    names = args.rows.split(",") if args.rows else [n for n, r in rows.items() if r.default]
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise CliError(f"unknown demo row(s) {unknown}; available: {list(rows)}")
    base = resolve_model_path(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = token_ids(tok, "eval", args.max_tokens)
    results = []
    for name in tqdm(names, desc="demo rows", disable=args.no_progress):
        model = rows[name].build(base, device=device, dtype=_torch_dtype(args.dtype))
        results.append(evaluate(model, tok, name, ids, context=args.context, stride=args.stride,
                                prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                                progress=not args.no_progress))
        del model
    print(f"\nhf-efficient demo on {base.name} ({device}); PPL over {ids.numel()} held-out tokens, "
          f"context {args.context}\n")
    _report(results, args, {"model": str(base), "device": device, "context": args.context,
                            "eval_tokens": ids.numel(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
    return 0


def _configure_eval(p):
    add_model_args(p)
    add_eval_args(p)


def _configure_bench(p):
    add_model_args(p)
    add_speed_args(p)


def _configure_demo(p):
    add_model_args(p)
    add_eval_args(p)
    add_speed_args(p)
    p.add_argument("--rows", default=None, help="comma-separated demo rows (default: all default rows)")
    # Quantized rows without a CPU kernel dequantize every layer on every decode step: keep the
    # default job a few minutes per row on 2 cores.
    p.set_defaults(max_tokens=4096, new_tokens=16, repeats=2)


def build_fp32(base, device="cpu", dtype=None):
    """The demo's baseline row: the unmodified model in float32."""
    import torch

    from .models import load_model

    return load_model(base, dtype=torch.float32, device=device)[0]


registry.add_command("eval", "perplexity on the held-out plays and a greedy sample", _configure_eval, run_eval)
registry.add_command("bench", "prefill/decode tokens/s, peak memory and size", _configure_bench, run_bench)
registry.add_command("demo", "the main job: evaluate every demo row (fp32 baseline and each feature)",
                     _configure_demo, run_demo)
registry.add_demo_row("fp32", "unmodified model, float32", build_fp32)
