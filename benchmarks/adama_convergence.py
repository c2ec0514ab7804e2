"""AdamA state formats vs AdamW + accumulation: final loss after >= 500 steps on real text.

Run: ``python -m benchmarks.adama_convergence [--steps 500] [--accumulation 4] [--methods ...]``
(CPU: ~2 min per method at the defaults on one core; ``--device cuda`` on a GPU).

Model: a small Llama (2 layers, hidden 128, tied embeddings) trained from scratch on the training
plays, tokenised with the embedded model's tokenizer; to keep it cheap on a 2-core CPU the
vocabulary is cut to the 8191 most frequent training tokens (+1 id for all others), so the
embedding is not 90 % of the parameters. Every method sees the same initial weights and the same
micro-batches in the same order (same LR schedule: linear warm-up, cosine decay to 10 %).
Reported: final training loss (mean of the last 10 % of steps), held-out loss (eval plays, fixed
windows), tokens/s, optimizer-state MB; ratios against AdamW. A loss-curve plot goes beside the table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_results

METHODS = {
    "adamw": None,  # torch AdamW + gradient accumulation (the baseline)
    "adama": dict(state_bits=32),
    "adama-bf16-sr": dict(state_bits=16, stochastic_rounding=True),
    "adama-bf16-nearest": dict(state_bits=16, stochastic_rounding=False),
    "adama-8bit": dict(state_bits=8, stochastic_rounding=False),
    "adama-8bit-sr": dict(state_bits=8, stochastic_rounding=True),
}
VOCAB = 8192


def corpus(train_tokens: int, eval_tokens: int):
    """(train ids, eval ids) remapped to the VOCAB - 1 most frequent training tokens (0: all others)."""
    from transformers import AutoTokenizer

    from hf_efficient.data import token_ids
    from hf_efficient.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    train, held = token_ids(tok, "train", train_tokens), token_ids(tok, "eval", eval_tokens)
    keep = torch.bincount(train, minlength=len(tok)).argsort(descending=True)[: VOCAB - 1]
    remap = torch.zeros(len(tok), dtype=torch.long)
    remap[keep] = torch.arange(1, VOCAB)
    return remap[train], remap[held]


def build_model(seed: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device)


def make_optimizer(method: str, model, lr: float, n: int, weight_decay: float):
    from hf_efficient.optim import AdamA

    kw = METHODS[method]
    if kw is None:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=next(model.parameters()).is_cuda)
    return AdamA(model.parameters(), lr=lr, weight_decay=weight_decay, accumulation_steps=n, **kw)


def lr_lambda(steps: int, warmup: int):
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    return f


def state_mb(opt) -> float:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes() / 2**20
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0) / 2**20


@torch.no_grad()
def eval_loss(model, windows, batch: int) -> float:
    model.eval()
    losses = [float(model(input_ids=w, labels=w).loss) for w in windows.split(batch)]
    model.train()
    return sum(losses) / len(losses)


def train(method, windows, held, *, steps, n, batch, lr, weight_decay, seed, device, log_every=50):
    model = build_model(seed, device).train()
    opt = make_optimizer(method, model, lr, n, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 20)))
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):
        total = torch.zeros((), device=device)
        for i in range(n):
            ids = windows[(s * n + i) * batch:(s * n + i + 1) * batch].to(device)
            loss = model(input_ids=ids, labels=ids).loss / n
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(total))
        if log_every and (s + 1) % log_every == 0:
            print(f"  [{method}] step {s + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, steps // 10):]
    return {"method": method, "final_loss": sum(tail) / len(tail), "eval_loss": eval_loss(model, held, 16),
            "tokens_per_s": steps * n * windows.shape[1] * batch / seconds, "seconds": seconds,
            "state_MB": state_mb(opt), "steps": steps, "losses": [round(x, 4) for x in losses]}


def plot(rows, path, title):
    try:
        import matplotlib
    except ImportError:  # the GPU image has none: plot from the JSON later (plot(json rows, ...))
        print(f"matplotlib missing: no {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    k = min(10, len(rows[0]["losses"]))  # running mean: the per-step loss of a few thousand tokens is noisy
    for r in rows:
        x = torch.tensor(r["losses"])
        sm = torch.nn.functional.avg_pool1d(x[None, None], k, 1)[0, 0]
        ax.plot(range(k, len(x) + 1), sm.tolist(), label=f"{r['method']} ({r['final_loss']:.3f})", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (running mean of {k})")
    ax.set_title(title)
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="adama_convergence")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", default=None, help="safetensors file of remapped ids (train, eval) to train on")
    ap.add_argument("--save-tokens", default=None, help="write the remapped ids to this file and exit")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result JSONs of earlier runs (same settings) to join into one table and plot")
    args = ap.parse_args(argv)
    if args.merge:
        return finish(args, [r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())["rows"]])
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; known: {list(METHODS)}")
    torch.set_num_threads(args.threads)
    n_windows = args.steps * args.accumulation * args.batch
    if args.tokens:  # a machine without the corpus/tokenizer: ids saved here by --save-tokens
        from safetensors.torch import load_file

        d = load_file(args.tokens)
        train_ids, held_ids = d["train"].long(), d["eval"].long()
    else:
        train_ids, held_ids = corpus(n_windows * args.seq_len // 2 + 100_000, 40_000)
    if args.save_tokens:
        from safetensors.torch import save_file

        Path(args.save_tokens).parent.mkdir(parents=True, exist_ok=True)
        save_file({"train": train_ids.to(torch.int16), "eval": held_ids.to(torch.int16)}, args.save_tokens)
        return
    from hf_efficient.data import sample_windows

    windows = sample_windows(train_ids, n_windows, args.seq_len, seed=args.seed)
    held = sample_windows(held_ids, 128, args.seq_len, seed=1).to(args.device)
    rows = []
    for m in methods:
        r = train(m, windows, held, steps=args.steps, n=args.accumulation, batch=args.batch, lr=args.lr,
                  weight_decay=args.weight_decay, seed=args.seed, device=args.device)
        print(f"{m}: final loss {r['final_loss']:.4f}, eval {r['eval_loss']:.4f}, {r['tokens_per_s']:.0f} tok/s, "
              f"states {r['state_MB']:.2f} MB", flush=True)
        rows.append(r)
        finish(args, rows)  # after every method: a run cut short still leaves its table


def finish(args, rows):
    order = list(METHODS)
    rows = sorted(rows, key=lambda r: order.index(r["method"]))
    args.methods = ",".join(r["method"] for r in rows)
    base = next((r for r in rows if r["method"] == "adamw"), rows[0])
    for r in rows:
        r["final_loss_ratio"] = r["final_loss"] / base["final_loss"]
        r["eval_loss_ratio"] = r["eval_loss"] / base["eval_loss"]
        r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name", "merge", "tokens", "save_tokens")}
    settings.update(model="Llama 2x128, vocab 8192 (top training tokens of the embedded tokenizer)",
                    data="training plays; eval: 128 x seq-len windows of the held-out plays")
    cols = ["method", "final_loss", "final_loss_ratio", "eval_loss", "eval_loss_ratio", "tokens_per_s",
            "throughput_ratio", "state_MB", "steps"]
    out = args.out or RESULTS_DIR
    write_results(args.name, rows, settings, out, columns=cols)
    plot(rows, Path(out) / f"{args.name}.png",
         f"{args.steps} steps x {args.accumulation} micro-batches x {args.batch} x {args.seq_len} tokens "
         f"({args.device})")


if __name__ == "__main__":
    main()
