"""SeerAttention sparse decode on the CPU: per-step decode attention time, ours vs dense SDPA in one run, and
(optionally) the attention-mass recall of the decode block selection on the embedded model.

Speed: one layer of a 7B-class GQA model (batch 1, 32 query heads, 8 KV heads, head dim 128, fp32), one query
token against a KV cache of 8k / 16k / 32k tokens (minus 27, so the last block is partial as in a real step).
``dense`` = transformers' ``sdpa_attention_forward`` (what ``decode="dense"`` runs; GQA without copies).
``seer`` = :func:`hf_efficient.attention.seer.decode.seer_decode_attention`, **gate cost included**: feature-cache
check, partial-block and query features, scores, selection, gather of the kept blocks, attention. The cache is
warm (steady state: a completed block adds one block's features every 64 steps); ``gate cold`` is the gate with
the cache empty (every block's features, what the first decode step after a prefill pays). Gates are random
(speed does not depend on their values) — but the *union* of a GQA group's choices does: with ``decode="sparse"``
random heads rarely agree, so the gathered share (``union``) is far above the per-head ``density`` (trained
heads of one group, which share their K features, are expected to agree more); ``decode="sparse_kv"`` makes
one choice per KV head, so ``union == density``.

Recall (``--recall``): the embedded SmolLM2-135M reads a held-out prompt once; for each layer and the last
``--positions`` query positions, the share of the true (dense) attention mass inside the blocks kept by
(a) the decode gate with *random* weights (no trained gates exist on this machine), (b) an oracle with the
same budget (top blocks by true mass), (c) sink + recent blocks with the same budget (StreamingLLM-style).

Run: ``nice python -m benchmarks.seer_decode [--ctxs 8192,16384,32768 --threads 1 --recall]``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import print_rows, time_cpu, write_results


class _Layer(torch.nn.Module):
    """What the attention functions read from a Llama attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.layer_idx = groups, True, 0


def bench_speed(ctxs, sparsities, threads, repeats, h=32, hkv=8, d=128, blk=64, gate_dim=128):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_efficient.attention.seer import AttnGate, SeerAttentionConfig
    from hf_efficient.attention.seer import decode as D
    from hf_efficient.kernels.seer_reference import attention_reference

    torch.manual_seed(0)
    layer = _Layer(h // hkv)
    rows = []
    for ctx in ctxs:
        sk = ctx - 27
        q = torch.randn(1, h, 1, d)
        k, v = torch.randn(1, hkv, sk, d), torch.randn(1, hkv, sk, d)
        t_dense = time_cpu(lambda: sdpa_attention_forward(layer, q, k, v, None, scaling=d ** -0.5), repeats=repeats,
                           threads=threads)
        dense_out = sdpa_attention_forward(layer, q, k, v, None, scaling=d ** -0.5)[0].transpose(1, 2)
        for sp, mode in [(sp, mode) for sp in sparsities for mode in ("sparse", "sparse_kv")]:
            gate = AttnGate(h, hkv, d, SeerAttentionConfig(block_size=blk, gate_dim=gate_dim, sparsity=sp,
                                                           decode=mode))
            mask = D.decode_block_mask(gate, q, k)  # warms the feature cache
            out = D.seer_decode_attention(gate, q, k, v)
            torch.testing.assert_close(out, attention_reference(q, k, v, block_mask=mask, block=blk),
                                       atol=1e-5, rtol=1e-5)
            if sp == 0:
                torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
            union = mask[:, :, 0].reshape(1, hkv, h // hkv, -1).any(2).float().mean().item()
            t_ours = time_cpu(lambda: D.seer_decode_attention(gate, q, k, v), repeats=repeats, threads=threads)
            t_gate = time_cpu(lambda: D.decode_block_mask(gate, q, k), repeats=repeats, threads=threads)
            t_cold = time_cpu(lambda: D.decode_block_mask(gate, q, k, use_cache=False), repeats=max(3, repeats // 4),
                              warmup=1, threads=threads)
            rows.append({"ctx": ctx, "decode": mode, "sparsity": sp, "density": round(mask.float().mean().item(), 3),
                         "union": round(union, 3), "seer_ms": t_ours * 1e3, "gate_ms": t_gate * 1e3,
                         "gate_cold_ms": t_cold * 1e3, "dense_ms": t_dense * 1e3, "speedup": t_dense / t_ours})
            print(rows[-1], flush=True)
    return rows


def bench_recall(ctx, n_pos, sparsities, seed=0, gates_dir=None):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_efficient.attention.seer import SeerAttentionConfig, attach_gates, gates_of, load_gates
    from hf_efficient.attention.seer import decode as D
    from hf_efficient.data import token_ids
    from hf_efficient.kernels import seer_reference as R
    from hf_efficient.models import load_default

    model, tok = load_default(dtype=torch.float32)
    ids = token_ids(tok, "eval", ctx)[None, :ctx]
    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        seen[module.layer_idx] = (query[:, :, -n_pos:].clone(), key.clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("seer_decode_capture", capture)
    model.set_attn_implementation("seer_decode_capture")
    with torch.no_grad():
        model(ids)
    if gates_dir:  # trained gates (e.g. saved by benchmarks/seer_quality.py)
        load_gates(model, gates_dir, decode="sparse")
        gates, label = gates_of(model), "gate (trained)"
    else:
        gates = attach_gates(model, SeerAttentionConfig(decode="sparse"), seed=seed, set_implementation=False)
        label = "gate (random)"
    blk = gates[0].config.block_size
    sums = {(m, sp): [] for sp in sparsities for m in (label, "oracle", "sink+recent")}
    dens = {sp: [] for sp in sparsities}
    for li, gate in enumerate(gates_of(model)):
        qs, k = seen[li]
        for i in range(n_pos):
            p = ctx - n_pos + i  # query position; a decode step there sees keys 0..p
            qp, kp = qs[:, :, i:i + 1], k[:, :, :p + 1]
            probs = R.attention_probs(qp, kp)
            nkb = -(-(p + 1) // blk)
            mass = torch.nn.functional.pad(probs, (0, nkb * blk - p - 1)).reshape(*probs.shape[:3], nkb, blk).sum(-1)
            for sp in sparsities:
                gate.config = gate.config.with_selection(sparsity=sp)
                sel = dict(mode="sparsity", threshold=0.0, top_k=1, sparsity=sp, block=blk, sq=1, sk=p + 1)
                masks = {label: D.decode_block_mask(gate, qp, kp, use_cache=False),
                         "oracle": R.select_block_mask(mass, **sel),
                         "sink+recent": R.sink_recent_block_mask(mass.shape[:2], 1, p + 1, sparsity=sp, block=blk)}
                for name, m in masks.items():
                    sums[(name, sp)].append((mass * m).sum(-1).mean().item())
                dens[sp].append(masks["oracle"].float().mean().item())
    rows = [{"selection": name, "sparsity": sp, "recall": sum(v) / len(v), "density": sum(dens[sp]) / len(dens[sp])}
            for (name, sp), v in sums.items()]
    settings = {"model": "SmolLM2-135M-Instruct (embedded), fp32", "context": ctx, "query_positions": n_pos,
                "block": blk, "layers": len(gates), "gate": (f"trained, from {gates_dir}" if gates_dir else
                                                             f"random init (seed {seed})") + ", decode selection"}
    return rows, settings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ctxs", default="8192,16384,32768")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--recall", action="store_true", help="also measure selection recall on the embedded model")
    ap.add_argument("--recall-ctx", type=int, default=4096)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--gates", default=None, help="trained gates folder for --recall (default: random gates)")
    args = ap.parse_args(argv)
    sps = [float(s) for s in args.sparsities.split(",")]
    if args.ctxs:
        rows = bench_speed([int(c) for c in args.ctxs.split(",")], sps, args.threads, args.repeats)
        settings = {"shape": "B1, 32 q heads, 8 KV heads, D128, fp32, one query token, block 64, gate_dim 128",
                    "threads": args.threads, "repeats": args.repeats, "gates": "random",
                    "seer": "gate (warm feature cache) + selection + gather + attention", "dense": "transformers "
                    "sdpa_attention_forward (enable_gqa)", "kv_len": "ctx - 27 (partial last block)"}
        print_rows(rows)
        write_results("seer_decode_cpu", rows, settings, args.out)
    if args.recall:
        rows, settings = bench_recall(args.recall_ctx, args.positions, sps, gates_dir=args.gates)
        print_rows(rows)
        write_results("seer_decode_recall_trained_cpu" if args.gates else "seer_decode_recall_cpu", rows, settings,
                      args.out)


if __name__ == "__main__":
    main()
