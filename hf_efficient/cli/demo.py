"""``hf-efficient demo``: the main job; evaluates every demo row (fp32 baseline and each feature)."""
from __future__ import annotations

from .common import (CliError, add_eval_args, add_model_args, add_speed_args, check_writable_file, report,
                     setup_runtime, torch_dtype)
from .demo_rows import BY_NAME, ROWS

HELP = "the main job: evaluate every demo row (fp32 baseline and each feature)"


def configure(p) -> None:
    add_model_args(p)
    add_eval_args(p)
    add_speed_args(p)
    p.add_argument("--rows", default=None, help="comma-separated demo rows, from: " + ", ".join(BY_NAME)
                   + " (None: all)")
    # Quantized rows without a CPU kernel dequantize every layer on every decode step: keep the
    # default job a few minutes per row on 2 cores.
    p.set_defaults(max_tokens=4096, new_tokens=16, repeats=2)


def run(args) -> int:
    check_writable_file(args.json)
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS if r.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise CliError(f"unknown demo row(s) {unknown}; available: {list(BY_NAME)}")
    device = setup_runtime(args)
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..data import token_ids
    from ..evaluation import evaluate
    from ..models import resolve_model_path

    base = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(base)
    ids = token_ids(tok, "eval", args.max_tokens)
    results = []
    for name in tqdm(names, desc="demo rows", disable=args.no_progress):
        model = BY_NAME[name].build(base, device=device, dtype=torch_dtype(args.dtype))
        results.append(evaluate(model, tok, name, ids, context=args.context, stride=args.stride,
                                prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                                progress=not args.no_progress))
        del model
    print(f"\nhf-efficient demo on {base.name} ({device}); PPL over {ids.numel()} held-out tokens, "
          f"context {args.context}\n")
    report(results, args, {"model": str(base), "device": device, "context": args.context,
                           "eval_tokens": ids.numel(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
    return 0
