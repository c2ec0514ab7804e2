"""``hf-efficient train-gate``: train SeerAttention gates on the corpus and save them."""
from __future__ import annotations

import json

from .common import CliError, add_model_args, fraction, positive_int, setup_runtime

HELP = "train SeerAttention gates by self-distillation and save them"


def configure(p) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder for the trained gates (seer_gates.safetensors + "
                                                "seer_config.json)")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="training window in tokens")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps")
    p.add_argument("--batch", type=positive_int, default=1, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--block-size", type=positive_int, default=64, help="gate/kernel block size")
    p.add_argument("--gate-dim", type=positive_int, default=64, help="gate projection width")
    p.add_argument("--sparsity", type=fraction, default=0.7, help="default block sparsity saved with the gates")
    p.add_argument("--max-tokens", type=positive_int, default=300_000,
                   help="training-split tokens to draw windows from")
    p.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here (None: OUT/checkpoints)")
    p.add_argument("--save-every", type=positive_int, default=25, help="checkpoint every N steps")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    p.add_argument("--seed", type=int, default=0, help="gate init and data-order seed")


def run(args) -> int:
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create --out folder {out}: {e.strerror or e}")
    device = setup_runtime(args)
    import torch

    from ..attention.seer.config import SeerAttentionConfig
    from ..attention.seer.io import save_gates
    from ..attention.seer.training import train_gates
    from ..data import token_ids
    from ..models import load_model

    try:
        config = SeerAttentionConfig(block_size=args.block_size, gate_dim=args.gate_dim, sparsity=args.sparsity)
    except ValueError as e:
        raise CliError(str(e))
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    ids = token_ids(tok, "train", args.max_tokens)
    if ids.numel() <= args.seq_len:
        raise CliError(f"--seq-len {args.seq_len} needs more than {ids.numel()} training tokens")
    history = train_gates(model, ids, config=config, seq_len=args.seq_len, steps=args.steps,
                          batch_size=args.batch, lr=args.lr, checkpoint_dir=args.checkpoint_dir or out / "checkpoints",
                          save_every=args.save_every, resume=not args.no_resume, seed=args.seed,
                          progress=not args.no_progress)
    save_gates(model, out)
    print(f"trained gates for {args.steps} steps (KL first {history[0]:.4f} -> last {history[-1]:.4f}); "
          f"saved to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"history": history, "out": str(out)}, indent=1) + "\n")
    return 0
