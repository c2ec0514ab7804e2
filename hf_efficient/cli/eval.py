"""``hf-efficient eval``: perplexity on the held-out plays and a greedy sample."""
from __future__ import annotations

from .common import add_eval_args, add_model_args, check_writable_file, report, setup_runtime, torch_dtype

HELP = "perplexity on the held-out plays and a greedy sample"


def configure(p) -> None:
    add_model_args(p)
    add_eval_args(p)


def run(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    from ..data import token_ids
    from ..evaluation import evaluate
    from ..models import load_model

    model, tok = load_model(args.model, dtype=torch_dtype(args.dtype), device=device)
    ids = token_ids(tok, "eval", args.max_tokens)
    res = evaluate(model, tok, args.model or "embedded-fp32", ids, context=args.context, stride=args.stride,
                   new_tokens=0, progress=not args.no_progress)
    report([res], args, {"context": args.context, "stride": args.stride, "tokens": ids.numel()})
    return 0
