"""AdamA vs AdamW + gradient accumulation: peak memory (CUDA max allocated), tokens/s, loss curves.

Run: ``python -m benchmarks.adama_memory [--out DIR] [--quick]`` (GPU; ``bash scripts/gpu.sh adama_memory``).

Configurations (random-initialised Llama models: the embedded GGUF cannot travel to the GPU machine):
* ``embedded``: SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152, tied),
  seq 512, micro-batch 4, accumulation 8, fp32 weights/grads/states, bf16 autocast.
* ``llama-1.4b``: hidden 2048, 24 layers, 16 heads, MLP 5632, vocab 32000, activation checkpointing,
  fp32 weights/grads/states, bf16 autocast, same batch shape.
Data: the training plays as UTF-8 bytes (token id = byte value; the tokenizer cannot travel either),
so the loss curves are of real text. Baseline: torch AdamW (fused). Theoretical cut = bytes AdamA
removes (gradients; for 8-bit also 3/4 of m and v) / baseline peak.
Also: the largest layer count of the 1.4B-width model that trains under a fixed memory cap
(``torch.cuda.set_per_process_memory_fraction``) with each optimizer.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_results

EMBEDDED = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
LLAMA_1B4 = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                 tie_word_embeddings=False)


def byte_batches(n: int, batch: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    try:
        from hf_efficient.data import split_text

        ids = torch.frombuffer(bytearray(split_text("train").encode("utf-8")), dtype=torch.uint8).long()
        source = "corpus train plays (UTF-8 bytes)"
    except Exception as e:  # noqa: BLE001 - the corpus package may be missing on a bare machine
        print(f"corpus unavailable ({e}); using random tokens")
        ids = torch.randint(0, 256, (1 << 22,), generator=torch.Generator().manual_seed(seed))
        source = "random bytes"
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n * batch,), generator=g)
    w = torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
    return list(w.view(n, batch, seqlen)), source


def builder(cfg: dict, checkpointing: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            m = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
        if checkpointing:  # transformers >= 5.2x renamed it; the GPU image has an older 5.x
            enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.config.use_cache = False
        return m
    return build


def n_params(cfg: dict) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**cfg)).parameters())


def compare(name, cfg, checkpointing, batches, steps, accumulation, device, max_seconds, lr):
    from hf_efficient.optim.demo import METHODS, format_rows, train_run

    build = builder(cfg, checkpointing)
    res = []
    for m in METHODS:
        r = train_run(m, build, batches, steps=steps, accumulation=accumulation, lr=lr, device=device,
                      autocast_dtype=torch.bfloat16 if device == "cuda" else None, warmup_steps=2,
                      max_seconds=max_seconds)
        print(f"[{name}] {m}: peak {r.peak_mb:.0f} MB, {r.tokens_per_s:.0f} tok/s, {len(r.losses)} steps, "
              f"loss {r.losses[0]:.3f} -> {r.final_loss:.3f}", flush=True)
        res.append(r)
    print(format_rows(res), flush=True)
    base = res[0]
    grad_mb = base.grad_mb
    rows = []
    for r in res:
        removed = 0.0 if r.method == "adamw" else grad_mb + (base.state_mb - r.state_mb)
        rows.append({"config": name, "method": r.method, "params_M": grad_mb * 2**20 / 4 / 1e6,
                     "peak_MB": r.peak_mb, "peak_cut": 1 - r.peak_mb / base.peak_mb,
                     "theoretical_cut": removed / base.peak_mb,
                     "share_of_theory": (1 - r.peak_mb / base.peak_mb) / (removed / base.peak_mb) if removed else None,
                     "tokens_per_s": r.tokens_per_s, "throughput_ratio": r.tokens_per_s / base.tokens_per_s,
                     "steps": len(r.losses), "final_loss": r.final_loss,
                     "final_loss_ratio": r.final_loss / base.final_loss, "state_MB": r.state_mb,
                     "losses": [round(x, 5) for x in r.losses]})
    return rows


def largest_fit(cap_gb, device, batches, layer_grid, accumulation=2, steps=2):
    """Largest num_hidden_layers of the 1.4B-width model that trains ``steps`` steps under the cap."""
    from hf_efficient.optim.demo import METHODS, train_run

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / total)
    out = []
    try:
        for m in METHODS:
            best = None
            for layers in layer_grid:
                cfg = dict(LLAMA_1B4, num_hidden_layers=layers)
                try:
                    train_run(m, builder(cfg, True), batches, steps=steps, accumulation=accumulation, device=device,
                              autocast_dtype=torch.bfloat16, warmup_steps=0)
                    best = layers
                except torch.OutOfMemoryError:
                    break
                finally:
                    torch.cuda.empty_cache()
            params = n_params(dict(LLAMA_1B4, num_hidden_layers=best)) if best else 0
            print(f"[fit {cap_gb} GB] {m}: {best} layers, {params / 1e9:.2f} B params", flush=True)
            out.append({"config": f"fit under {cap_gb} GB", "method": m, "max_layers": best,
                        "max_params_B": params / 1e9})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    base = out[0]["max_params_B"] or float("nan")
    for r in out:
        r["params_vs_adamw"] = r["max_params_B"] / base
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of the embedded-shape run")
    ap.add_argument("--big-steps", type=int, default=20, help="optimizer steps of the 1.4B run")
    ap.add_argument("--max-seconds", type=float, default=75.0, help="time cap per method and config")
    ap.add_argument("--cap-gb", type=float, default=16.0, help="memory cap of the largest-fit search")
    ap.add_argument("--no-fit", action="store_true", help="skip the largest-fit search")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few steps (CPU smoke run)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    accumulation, micro, seq = 8, 4, 512
    emb_cfg, big_cfg = EMBEDDED, LLAMA_1B4
    if args.quick:
        accumulation, micro, seq, args.steps, args.big_steps = 2, 1, 64, 3, 3
        emb_cfg = dict(EMBEDDED, num_hidden_layers=2, vocab_size=512)
        big_cfg = dict(LLAMA_1B4, num_hidden_layers=1, hidden_size=128, intermediate_size=256, vocab_size=512,
                       num_attention_heads=4, num_key_value_heads=4)
        args.no_fit = True
    batches, source = byte_batches(args.steps * accumulation, micro, seq)
    rows = compare("embedded-shape 135M", emb_cfg, False, batches, args.steps, accumulation, device,
                   args.max_seconds, 3e-4)
    print(f"elapsed {time.time() - t0:.0f}s", flush=True)
    rows += compare("llama-1.4b fp32 + checkpointing", big_cfg, True, batches, args.big_steps, accumulation, device,
                    args.max_seconds, 1e-4)
    print(f"elapsed {time.time() - t0:.0f}s", flush=True)
    fit = [] if args.no_fit or device != "cuda" else largest_fit(args.cap_gb, device, batches,
                                                                   [8, 16, 24, 32, 40, 48, 56, 64])
    print(f"elapsed {time.time() - t0:.0f}s", flush=True)
    settings = {"device": device, "micro_batch": micro, "seq_len": seq, "accumulation": accumulation,
                "data": source, "autocast": "bf16" if device == "cuda" else None, "baseline": "torch AdamW fused",
                "embedded_cfg": emb_cfg, "big_cfg": big_cfg, "max_seconds_per_run": args.max_seconds,
                "cap_gb": None if args.no_fit else args.cap_gb}
    cols = ["config", "method", "params_M", "peak_MB", "peak_cut", "theoretical_cut", "share_of_theory",
            "tokens_per_s", "throughput_ratio", "steps", "final_loss", "final_loss_ratio"]
    write_results(f"adama_memory_{device}", rows, settings, args.out, columns=cols)
    if fit:
        write_results(f"adama_fit_{device}", fit, settings, args.out,
                      columns=["config", "method", "max_layers", "max_params_B", "params_vs_adamw"])


if __name__ == "__main__":
    main()
