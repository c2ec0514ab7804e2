"""``hf-efficient distill``: BitDistiller QAT with self-distillation, exported to a packed checkpoint."""
from __future__ import annotations

import json

from .common import CliError, add_model_args, positive_int, setup_runtime

HELP = "quantization-aware training with self-distillation (BitDistiller, CAKLD) into a 2/3/4-bit checkpoint"


def configure(p) -> None:
    add_model_args(p)
    p.add_argument("--out", required=True, help="run folder: data/, checkpoints/ (resumable), model/ (export)")
    p.add_argument("--bits", type=positive_int, default=2, help="weight bits (2, 3 or 4)")
    p.add_argument("--group-size", type=int, default=64, help="columns per scale group; -1 per channel")
    p.add_argument("--fmt", choices=("int", "nf", "fp"), default="int", help="weight format family")
    p.add_argument("--loss", choices=("cakld", "fkl", "rkl", "ce"), default="cakld",
                   help="distillation loss: confidence-aware KL, forward KL, reverse KL or plain cross-entropy")
    p.add_argument("--no-clip", action="store_true", help="skip the asymmetric clipping init")
    p.add_argument("--clip-grid", type=positive_int, default=10, help="candidates per side in the clipping search")
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    p.add_argument("--samples", type=positive_int, default=256, help="teacher-generated training sequences")
    p.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens per generated sequence")
    p.add_argument("--gen-len", type=positive_int, default=224, help="tokens the teacher generates per sequence")
    p.add_argument("--prompt", action="append", default=None, help="extra prompt for data generation (repeatable)")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument("--seed", type=int, default=0, help="seed of data generation and training")


def run(args) -> int:
    device = setup_runtime(args)
    from ..distill.config import BitDistillerConfig
    from ..distill.run import distill
    from .common import torch_dtype

    try:
        cfg = BitDistillerConfig(bits=args.bits, group_size=args.group_size, fmt=args.fmt, loss=args.loss,
                                 clip=not args.no_clip, clip_grid=args.clip_grid)
        _, _, path = distill(args.model, cfg, args.out, steps=args.steps, batch_size=args.batch, lr=args.lr,
                             samples=args.samples, prompt_len=args.prompt_len, gen_len=args.gen_len,
                             device=device, dtype=torch_dtype(args.dtype), save_every=args.save_every,
                             resume=not args.no_resume, prompts=args.prompt, seed=args.seed,
                             progress=not args.no_progress)
    except ValueError as e:
        raise CliError(str(e))
    print(f"BitDistiller {cfg.weight_format} g{cfg.group_size} ({cfg.loss}): wrote {path}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"out": str(path), "config": cfg.to_dict()}, indent=1) + "\n")
    return 0
