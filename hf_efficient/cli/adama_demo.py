"""``hf-efficient adama-demo``: train the embedded model briefly, AdamW + accumulation vs AdamA."""
from __future__ import annotations

from .common import CliError, add_model_args, check_writable_file, positive_int, setup_runtime

HELP = "train the embedded model briefly: AdamW + accumulation vs AdamA (memory, loss)"
METHODS = ("adamw", "adama", "adama8")  # hf_efficient.optim.demo.METHODS; spelled here so --help imports no torch


def configure(p) -> None:
    add_model_args(p)
    p.add_argument("--steps", type=positive_int, default=5, help="optimizer steps")
    p.add_argument("--accumulation", type=positive_int, default=4, help="micro-batches per step")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-5, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for data windows")
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS)
                   + " (None: all on CUDA; adamw,adama on CPU, where 8-bit states are slow)")


def run(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import resolve_model_path
    from ..optim.demo import METHODS as LIB_METHODS, corpus_batches, format_rows, train_run

    # 8-bit (de)quantization is plain torch per micro-batch: fine on a GPU, minutes per step on 2 CPU cores
    methods = (args.methods or ("adamw,adama,adama8" if device.startswith("cuda") else "adamw,adama")).split(",")
    bad = [m for m in methods if m not in LIB_METHODS]
    if bad:
        raise CliError(f"unknown method(s) {bad}; available: {list(LIB_METHODS)}")
    base = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(base)
    batches = corpus_batches(tok, args.steps * args.accumulation, args.micro_batch, args.seq_len, seed=args.seed)

    def build():
        torch.manual_seed(args.seed)
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    results = []
    for m in methods:
        show = None if args.no_progress else (lambda meth, i, loss: print(f"  {meth} step {i + 1}/{args.steps}: "
                                                                            f"loss {loss:.4f}", flush=True))
        results.append(train_run(m, build, batches, steps=args.steps, accumulation=args.accumulation, lr=args.lr,
                                 device=device, warmup_steps=1, progress=show))
        print(f"{m}: losses {[round(x, 3) for x in results[-1].losses]}", flush=True)
    print(f"\nAdamA demo on {base.name} ({device}): seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"accumulation {args.accumulation}, {args.steps} steps, lr {args.lr}"
          + (" (peak = process RSS on CPU)" if device == "cpu" else " (peak = CUDA max allocated)") + "\n")
    print(format_rows(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                       "rows": [r.__dict__ for r in results]}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0
