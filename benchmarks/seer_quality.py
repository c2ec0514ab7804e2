"""SeerAttention quality on the embedded SmolLM2-135M: train gates by self-distillation (base model frozen),
then held-out perplexity dense vs SeerAttention at each sparsity, and the attention-mass recall of the
selected blocks (share of the true softmax mass inside the kept blocks) with the real kept-block density.

GPU (about 1-3 minutes on an H100 with the defaults; bf16 model, fp32 gates)::

    python -m benchmarks.seer_quality --device cuda --dtype bfloat16 --out DIR

On the GPU machine the model and the token slices (``train:300000``, ``eval:65536`` with the defaults) come
through ``scripts/carry_model.sh`` (see CONTRIBUTING.md). CPU smoke run: ``python -m benchmarks.seer_quality --device cpu --dtype float32 --steps 2 --seq-len 256
--context 256 --eval-tokens 1024 --recall-windows 1``. Results: ``DIR/seer_quality_<device>.{json,md}`` and the
trained gates under ``DIR/seer_gates_smollm2`` (or ``--gates``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Sink + local baseline: the same per-row block budget as SeerAttention's 'sparsity' mode, but the kept blocks
# are the first one and the most recent ones (StreamingLLM-style), no gate. If the learned gate cannot beat
# this trivial rule, it has learned nothing useful.
_BASELINE = {"sparsity": 0.0, "block": 64, "records": None}


def sink_local_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from hf_efficient.kernels import seer_reference as ref

    sq, sk, blk = query.shape[2], key.shape[2], _BASELINE["block"]
    if sq != sk or attention_mask is not None:
        raise ValueError("the sink+local baseline is for unpadded prefill windows (perplexity) only")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    mask = ref.sink_recent_block_mask(query.shape[:2], sq, sk, sparsity=_BASELINE["sparsity"], block=blk,
                                      device=query.device)
    if _BASELINE["records"] is not None:
        p = ref.attention_probs(query, key, causal=True, scale=scale)
        _BASELINE["records"].append({
            "recall": (p * ref.expand_block_mask(mask, sq, sk, blk)).sum(-1).mean().item(),
            "density": (mask.sum() / (ref.causal_block_mask(sq, sk, blk, query.device).sum() * mask.shape[0]
                                      * mask.shape[1])).item()})
    kv_idx, kv_cnt = ref.block_mask_to_indices(mask)
    out = torch.ops.hf_efficient.seer_sparse_attention(query, key, value, kv_idx, kv_cnt, True, scale, blk)
    return out.transpose(1, 2), None


def _baseline_row(model, eval_ids, windows, sparsity, dense_ppl, context, block):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from hf_efficient.evaluation import perplexity

    AttentionInterface.register("sink_local_baseline", sink_local_attention)
    AttentionMaskInterface.register("sink_local_baseline", sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation("sink_local_baseline")
    _BASELINE.update(sparsity=sparsity, block=block)
    try:
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, context=context, progress=False)
        t_eval = time.perf_counter() - t0
        _BASELINE["records"] = recs = []
        with torch.no_grad():
            for w in windows:
                model.get_decoder()(input_ids=w[None].to(model.device), use_cache=False)
    finally:
        _BASELINE["records"] = None
        model.set_attn_implementation(before)
    return {"name": f"sink+local sparsity {sparsity:.0%}", "sparsity": sparsity, "ppl": ppl,
            "ppl_delta_pct": 100 * (ppl / dense_ppl - 1), "recall": sum(r["recall"] for r in recs) / len(recs),
            "density": sum(r["density"] for r in recs) / len(recs), "eval_s": t_eval}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="model dtype (default bfloat16 on CUDA, float32 on CPU); gates always train in fp32")
    ap.add_argument("--steps", type=int, default=400, help="gate training steps")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per training step")
    ap.add_argument("--seq-len", type=int, default=2048, help="training window (tokens)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--train-tokens", type=int, default=300_000,
                    help="corpus tokens to draw windows from (the GPU image has no `datasets`: the slice must be "
                         "pre-tokenized, e.g. TOKEN_SLICES='eval:65536 train:300000' bash scripts/carry_model.sh split)")
    ap.add_argument("--context", type=int, default=2048, help="eval context (2048 = 32 blocks of 64)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored per setting")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--recall-windows", type=int, default=4, help="held-out windows for attention-mass recall")
    ap.add_argument("--gates", default=None, help="where trained gates are saved (default OUT/seer_gates_smollm2)")
    ap.add_argument("--init-gates", default=None,
                    help="continue training gates saved by an earlier run (its --steps more steps, fresh optimizer)")
    ap.add_argument("--threads", type=int, default=None, help="CPU torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the sink+local rows (first block + most recent blocks, same budget, no gate)")
    ap.add_argument("--name", default=None, help="results file stem (default seer_quality_<device>)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = DTYPES[args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    import hf_efficient  # noqa: F401  (registers seer_attention)
    from hf_efficient.attention.seer import SeerAttentionConfig, configure, load_gates, save_gates, train_gates
    from hf_efficient.attention.seer.training import attention_recall
    from hf_efficient.data import sample_windows, token_ids
    from hf_efficient.evaluation import perplexity
    from hf_efficient.models import load_default

    out_dir = Path(args.out) if args.out else Path(__file__).parent / "results"
    gates_dir = Path(args.gates) if args.gates else out_dir / "seer_gates_smollm2"
    model, tok = load_default(dtype=dtype, device=dev)
    model.set_attn_implementation("sdpa")
    train_ids = token_ids(tok, "train", args.train_tokens)
    eval_ids = token_ids(tok, "eval", args.eval_tokens)
    print(f"train tokens {train_ids.numel()}, eval tokens {eval_ids.numel()}, {dtype}, {dev}", flush=True)
    _sync(dev)
    t0 = time.perf_counter()
    dense_ppl = perplexity(model, eval_ids, context=args.context, progress=False)
    _sync(dev)
    rows = [{"name": "dense (sdpa)", "sparsity": 0.0, "ppl": dense_ppl, "ppl_delta_pct": 0.0, "recall": 1.0,
             "density": 1.0, "eval_s": time.perf_counter() - t0}]
    print(rows[-1], flush=True)
    cfg = SeerAttentionConfig(block_size=args.block_size, gate_dim=args.gate_dim)
    if args.init_gates:
        load_gates(model, args.init_gates)
        cfg = None  # train_gates continues the loaded gates
    t0 = time.perf_counter()
    hist = train_gates(model, train_ids, config=cfg, seq_len=args.seq_len, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=True)
    _sync(dev)
    t_train = time.perf_counter() - t0
    save_gates(model, gates_dir)
    windows = sample_windows(eval_ids, args.recall_windows, args.context, seed=1)
    for sp in (float(x) for x in args.sparsities.split(",")):
        configure(model, mode="sparsity", sparsity=sp)
        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, context=args.context, progress=False)
        _sync(dev)
        t_eval = time.perf_counter() - t0
        rec = attention_recall(model, windows)
        rows.append({"name": f"seer sparsity {sp:.0%}", "sparsity": sp, "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / dense_ppl - 1), "recall": rec["recall"],
                     "density": rec["density"], "eval_s": t_eval})
        print(rows[-1], flush=True)
        if args.baseline:
            rows.append(_baseline_row(model, eval_ids, windows, sp, dense_ppl, args.context, args.block_size))
            print(rows[-1], flush=True)
    n5 = min(5, len(hist))
    settings = {"model": f"embedded SmolLM2-135M-Instruct ({str(dtype)[6:]}, {dev.type})",
                "block_size": args.block_size, "gate_dim": args.gate_dim, "train_steps": args.steps,
                "batch_size": args.batch_size, "train_seq_len": args.seq_len, "lr": args.lr,
                "init_gates": args.init_gates,
                "train_s": t_train, "kl_first5": sum(hist[:n5]) / n5, "kl_last5": sum(hist[-n5:]) / n5,
                "context": args.context, "eval_tokens": eval_ids.numel(), "recall_windows": args.recall_windows,
                "gates": str(gates_dir), "note": "dense = SDPA; seer = gates trained here (base frozen), "
                "sparsity = share of each query block's causal key blocks skipped before the forced first + "
                "diagonal blocks (density = kept / causal blocks, measured)"}
    print(settings, flush=True)
    write_results(args.name or f"seer_quality_{dev.type}", rows, settings, out_dir)


if __name__ == "__main__":
    main()
