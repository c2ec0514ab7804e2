"""SeerAttention prefill latency (GPU): gate + block selection + block-sparse kernel vs SDPA-flash, SDPA-cuDNN
and FlexAttention with the same block mask, all on the same inputs in one run; plus the pooled-map kernel
(training target) vs SDPA-flash, and gate training time on a SmolLM2-135M-shaped model.

Shape: batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, causal. Sparsity = share of each query
block's causal key blocks skipped (first and diagonal blocks always kept, so real density is reported).
Run: ``python -m benchmarks.seer_attention [--seqs 8192,16384,32768 --out DIR]``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.common import print_rows, time_fn, write_results

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def time_cuda(fn):
    return time_fn(fn, DEV) if DEV == "cuda" else time_fn(fn, DEV, repeats=1, warmup=0)


# FlexAttention's default tiles are 128 wide; our 64-token blocks need 64-wide tiles (it raises otherwise).
KOPT = {"BLOCK_M": 64, "BLOCK_N": 64}


def _flex_block_mask(block_mask, blk, sq):
    """Our (B, H, nQB, nKB) block mask as a FlexAttention BlockMask: diagonal blocks partial (causal mask_mod),
    the other kept blocks full."""
    from torch.nn.attention.flex_attention import BlockMask

    nqb = block_mask.shape[-2]
    diag = torch.zeros_like(block_mask)
    ar = torch.arange(nqb, device=block_mask.device)
    diag[..., ar, ar] = True
    partial, full = block_mask & diag, block_mask & ~diag

    def idx(m):
        cnt = m.sum(-1, dtype=torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt, order

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    pc, pi = idx(partial)
    fc, fi = idx(full)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=blk, mask_mod=causal, seq_lengths=(sq, sq))


def bench_prefill(seqs, sparsities, h=32, hkv=8, d=128, blk=64, gate_dim=128, on_seq=None, torch_gate=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from hf_efficient.attention.seer import AttnGate, SeerAttentionConfig
    from hf_efficient.kernels.seer_attention import sparse_attention
    from hf_efficient.kernels.seer_reference import (causal_block_mask, gate_block_indices_reference,
                                                     indices_to_block_mask)

    flex = torch.compile(flex_attention, dynamic=False)
    F = torch.nn.functional
    rows = []
    for s in seqs:
        torch.manual_seed(0)
        q = torch.randn(1, h, s, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        ke, ve = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        base = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    base[name] = time_cuda(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True))
            except (RuntimeError, NotImplementedError) as e:
                print(f"{name} unavailable at {s}: {e}", flush=True)
                base[name] = float("nan")
        dense_flops = 4 * h * d * s * s / 2
        for sp in sparsities:
            gate = AttnGate(h, hkv, d, SeerAttentionConfig(block_size=blk, gate_dim=gate_dim, sparsity=sp)).to(DEV)
            c = gate.config
            sel = dict(block=blk, theta=c.rope_theta, mode=c.mode, threshold=c.threshold, top_k=c.top_k,
                       sparsity=c.sparsity)

            def gate_only():
                with torch.no_grad():
                    return gate.block_indices(q, k)  # what attn_implementation="seer_attention" runs

            def seer_prefill():
                idx, cnt = gate_only()
                return sparse_attention(q, k, v, idx, cnt, block=blk)

            def gate_torch():  # the plain-torch twin of the same gate, for the record
                with torch.no_grad():
                    return gate_block_indices_reference(q, k, gate.q_weight, gate.k_weight, **sel)

            idx, cnt = gate_only()
            nkb = idx.shape[-1]
            bm = indices_to_block_mask(idx, cnt, nkb)
            density = (cnt.sum() / (causal_block_mask(s, s, blk, DEV).sum() * h)).item()
            kernel_only = lambda: sparse_attention(q, k, v, idx, cnt, block=blk)  # noqa: E731
            try:
                seer_prefill()  # autotune outside the timing
                t_seer, t_kernel, t_gate = time_cuda(seer_prefill), time_cuda(kernel_only), time_cuda(gate_only)
            except Exception:  # noqa: BLE001  (report, keep the baselines)
                import traceback

                traceback.print_exc()
                t_seer = t_kernel = t_gate = float("nan")
            try:
                t_gate_torch = time_cuda(gate_torch) if torch_gate else float("nan")
            except Exception as e:  # noqa: BLE001
                print(f"torch gate failed at {s}/{sp}: {type(e).__name__}: {e}", flush=True)
                t_gate_torch = float("nan")
            try:
                fbm = _flex_block_mask(bm, blk, s)
                flex(q, k, v, block_mask=fbm, enable_gqa=True, kernel_options=KOPT)
                t_flex = time_cuda(lambda: flex(q, k, v, block_mask=fbm, enable_gqa=True, kernel_options=KOPT))
            except Exception as e:  # noqa: BLE001  (report, keep the other columns)
                print(f"flex failed at {s}/{sp}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                t_flex = float("nan")
            rows.append({"seq": s, "sparsity": sp, "density": density, "seer_ms": t_seer * 1e3,
                         "seer_kernel_ms": t_kernel * 1e3, "gate_ms": t_gate * 1e3,
                         "gate_torch_ms": t_gate_torch * 1e3,
                         "sdpa_flash_ms": base["sdpa_flash"] * 1e3, "sdpa_cudnn_ms": base["sdpa_cudnn"] * 1e3,
                         "flex_ms": t_flex * 1e3, "x_vs_flash": base["sdpa_flash"] / t_seer,
                         "x_vs_cudnn": base["sdpa_cudnn"] / t_seer, "x_vs_flex": t_flex / t_seer,
                         "kernel_TFLOPs": dense_flops * density / t_kernel / 1e12})
            print_rows(rows[-1:])
            del bm, idx, cnt
        del q, k, v, ke, ve
        if on_seq is not None:
            on_seq(rows)  # results survive a run cut short at a longer sequence
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_pooled(seqs, h=32, hkv=8, d=128, blk=64):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_efficient.kernels.seer_attention import pooled_attention

    rows = []
    for s in seqs:
        q = torch.randn(1, h, s, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, s, d, device=DEV, dtype=torch.bfloat16)
        ke, ve = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        t_pool = time_cuda(lambda: pooled_attention(q, k, v, block=blk))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_flash = time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True))
        rows.append({"seq": s, "pooled_map_fa_ms": t_pool * 1e3, "sdpa_flash_ms": t_flash * 1e3,
                     "overhead_x": t_pool / t_flash})
        print_rows(rows[-1:])
    return rows


def bench_training(steps: int, seq_len: int):
    """train_gates on a random-initialised model with the embedded SmolLM2-135M's config (bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_efficient  # noqa: F401
    from hf_efficient.attention.seer import SeerAttentionConfig, train_gates

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    ids = torch.randint(0, 49152, (200_000,))
    train_gates(model, ids, config=SeerAttentionConfig(), seq_len=seq_len, steps=2, progress=False)  # warm-up
    if DEV == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hist = train_gates(model, ids, config=None, seq_len=seq_len, steps=steps, progress=False)
    if DEV == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return [{"model": "SmolLM2-135M shape (random init, bf16)", "seq_len": seq_len, "steps": steps,
             "train_s": dt, "s_per_step": dt / steps, "kl_first": hist[0], "kl_last": hist[-1]}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seqs", default="32768,8192,16384,65536,131072")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--train-seq", type=int, default=8192)
    ap.add_argument("--pooled-seqs", default="8192,32768", help="pooled-map kernel lengths ('' to skip)")
    ap.add_argument("--no-torch-gate", action="store_true", help="skip timing the plain-torch gate twin")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("seer_attention benchmark needs CUDA (quality on CPU: python -m benchmarks.seer_quality)")
    seqs = [int(x) for x in args.seqs.split(",")]
    sps = [float(x) for x in args.sparsities.split(",")]
    kw = dict(h=4, hkv=2, d=32) if args.smoke else {}
    settings = {"batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "causal": True,
                "block": 64, "gate_dim": 128,
                "seer_ms": "fused Triton gate (pool+project+RoPE, score matmul, selection -> indices) + sparse kernel",
                "gate_torch_ms": "the same gate as plain-torch ops (the twin), for comparison",
                "baselines": "SDPA flash / cuDNN with KV expanded to 32 heads; FlexAttention compiled, same mask"}

    def save(rows):
        write_results("seer_attention_prefill", sorted(rows, key=lambda r: (r["seq"], r["sparsity"])), settings,
                      args.out)

    bench_prefill(seqs, sps, on_seq=save, torch_gate=not args.no_torch_gate, **kw)
    pooled_seqs = [256] if args.smoke else [int(x) for x in args.pooled_seqs.split(",") if x]
    if pooled_seqs:
        pooled = bench_pooled(pooled_seqs, **kw)
        write_results("seer_pooled_map", pooled, {"note": "FlashAttention + block-max-pooled map (training target) vs "
                                                          "SDPA-flash"}, args.out)
    if args.train_steps:
        write_results("seer_train_gate_gpu", bench_training(args.train_steps, args.train_seq), {}, args.out)


if __name__ == "__main__":
    main()
