"""SeerAttention quality on the embedded SmolLM2-135M (CPU): train gates, then held-out perplexity dense vs
sparse at each sparsity, and the attention-mass recall of the selected blocks.

Runs on CPU on purpose: the embedded model (98 MB GGUF) cannot travel to the GPU runner, so contexts are
modest (default 1024 tokens, 64-token blocks) and gate training short. Run:
``python -m benchmarks.seer_quality [--steps 60 --seq-len 1024 --context 1024 --out DIR]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--recall-windows", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gates", default="benchmarks/results/seer_gates_smollm2", help="where trained gates go")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import hf_efficient  # noqa: F401
    from hf_efficient.attention.seer import SeerAttentionConfig, configure, save_gates, train_gates
    from hf_efficient.attention.seer.training import attention_recall
    from hf_efficient.data import sample_windows, token_ids
    from hf_efficient.evaluation import perplexity
    from hf_efficient.models import load_default

    model, tok = load_default()
    train_ids = token_ids(tok, "train", 300_000)
    eval_ids = token_ids(tok, "eval", args.eval_tokens)
    t0 = time.perf_counter()
    dense_ppl = perplexity(model, eval_ids, context=args.context, progress=False)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    hist = train_gates(model, train_ids, config=SeerAttentionConfig(block_size=64, gate_dim=64), seq_len=args.seq_len,
                       steps=args.steps, lr=args.lr, progress=True)
    t_train = time.perf_counter() - t0
    save_gates(model, args.gates)
    rows = [{"name": "dense (sdpa)", "sparsity": 0.0, "ppl": dense_ppl, "ppl_delta_pct": 0.0, "recall": 1.0,
             "density": 1.0, "eval_s": t_dense}]
    windows = sample_windows(eval_ids, args.recall_windows, args.context, seed=1)
    for sp in (0.5, 0.7, 0.9):
        configure(model, mode="sparsity", sparsity=sp)
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, context=args.context, progress=False)
        t_eval = time.perf_counter() - t0
        rec = attention_recall(model, windows)
        rows.append({"name": f"seer sparsity {sp:.0%}", "sparsity": sp, "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / dense_ppl - 1), "recall": rec["recall"],
                     "density": rec["density"], "eval_s": t_eval})
        print(rows[-1], flush=True)
    settings = {"model": "embedded SmolLM2-135M-Instruct (fp32, CPU)", "block_size": 64, "gate_dim": 64,
                "train_steps": args.steps, "train_seq_len": args.seq_len, "lr": args.lr, "train_s": t_train,
                "kl_first5": sum(hist[:5]) / 5, "kl_last5": sum(hist[-5:]) / 5, "context": args.context,
                "eval_tokens": eval_ids.numel(), "threads": args.threads,
                "note": "CPU run: the embedded model cannot travel to the GPU runner (98 MB > 64 MiB carry limit)"}
    print(settings)
    write_results("seer_quality_cpu", rows, settings, args.out)


if __name__ == "__main__":
    main()
