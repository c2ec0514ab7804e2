"""Pre-gated MoE expert offloading: decode/prefill speed, device memory, bytes copied and recall per mode.

Rows (one model, one run, same inputs): GPU-only (every expert resident; eager experts, the exact reference, and
transformers' default grouped_mm), accelerate ``cpu_offload`` of each layer's experts module (whole modules copied
every step), and our offload in each mode (on_demand, lru, prefetch_all, speculative, pregated) at a device budget
of ``--budget-frac`` of the model's expert bytes.

The model is random-initialised with a real shape (``--shape olmoe``: OLMoE-1B-7B widths, 64 experts top-8;
``mixtral``: Mixtral-8x7B widths, 8 experts top-2; ``--layers`` of them): speed does not depend on weight values,
but routing locality does, and a random-initialised router is not a trained one (on the OLMoE shape it picks
nearly the same experts for every token: LRU hit rate 0.92 at a quarter of the experts). Decode is teacher-forced
on a fixed random token sequence, so no row gains from a degenerate repeated output. ``pregated`` here uses
untrained pre-gates (copies of the next router), so its speed is measured, its outputs are not the model's.

    python -m benchmarks.moe_offload --shape olmoe --layers 8          # GPU
    python -m benchmarks.moe_offload --shape tiny --device cpu          # smoke test
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.common import print_rows, write_results
from hf_efficient.evaluation import cache_kwarg
from hf_efficient.moe import add_pregates, enable_pregated_offload, find_moe_layers

SHAPES = {
    "olmoe": ("OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                  num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)),
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                      num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000)),
    "tiny": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)),
}
MODES = ("on_demand", "lru", "prefetch_all", "speculative", "pregated")


def build(shape: str, layers: int, device: str, dtype: torch.dtype):
    import transformers

    cls_name, kw = SHAPES[shape]
    cfg = getattr(transformers, cls_name)(num_hidden_layers=layers, max_position_embeddings=4096, **kw)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    model.set_experts_implementation("eager")
    return model


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def pinned_h2d_gbs(device, nbytes=1 << 30, reps=5) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device=device)
    d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


@torch.no_grad()
def measure(model, prompt, decode_ids, device, warm_steps, offload=None) -> tuple[dict, torch.Tensor]:
    """Prefill ``prompt`` (timed), ``warm_steps`` untimed decode steps, then the rest of ``decode_ids`` timed."""
    from transformers import DynamicCache

    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    kv = {cache_kwarg(): DynamicCache(config=model.config), "use_cache": True}
    sync(device)
    t0 = time.perf_counter()
    model(input_ids=prompt, **kv)
    sync(device)
    t_prefill = time.perf_counter() - t0
    prefill_stats = offload.stats.to_dict() if offload else {}
    for tok in decode_ids[:warm_steps]:
        model(input_ids=tok.view(1, 1), **kv)
    if offload:
        offload.reset_stats()
    logits = []
    timed = decode_ids[warm_steps:]
    sync(device)
    t0 = time.perf_counter()
    for tok in timed:
        logits.append(model(input_ids=tok.view(1, 1), **kv).logits[0, -1])
    sync(device)
    t_decode = time.perf_counter() - t0
    n = len(timed)
    row = {"prefill_tok_s": prompt.shape[1] / t_prefill, "decode_tok_s": n / t_decode,
           "peak_gpu_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    if offload:
        s = offload.stats
        row.update(bytes_per_token_MB=s.bytes_copied / n / 1e6, recall=s.recall, hit_rate=s.hit_rate,
                   wasted_MB_per_token=s.wasted_bytes / n / 1e6, h2d_GB_s=s.bytes_copied / t_decode / 1e9,
                   prefill_copied_GB=prefill_stats["bytes_copied"] / 1e9)
    return row, torch.stack(logits).float().cpu()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget-frac", type=float, default=0.25, help="device budget / the model's expert bytes")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=24, help="timed decode steps per row")
    ap.add_argument("--warm-steps", type=int, default=4)
    ap.add_argument("--accelerate-decode", type=int, default=3, help="timed decode steps of the accelerate row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=None, help="result file name (default moe_offload_<shape>)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build(a.shape, a.layers, a.device, dtype)
    layers = find_moe_layers(model)
    expert_bytes = layers[0].expert_bytes * layers[0].num_experts * len(layers)
    budget_gb = a.budget_frac * expert_bytes / 2**30
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, a.prompt_len), generator=g).to(a.device)
    decode_ids = torch.randint(0, vocab, (a.warm_steps + a.decode,), generator=g).to(a.device)
    settings = dict(shape=a.shape, layers=a.layers, dtype=str(dtype), expert_GB=expert_bytes / 1e9,
                    budget_GiB=budget_gb, budget_frac=a.budget_frac, prompt_len=a.prompt_len, decode=a.decode,
                    warm_steps=a.warm_steps, pinned_h2d_GB_s=pinned_h2d_gbs(a.device), batch=1,
                    weights="random init (real shape); decode teacher-forced on random tokens; pre-gates untrained")
    print("settings", settings, flush=True)
    model(input_ids=prompt[:, :16])  # kernels and allocator warm for every row
    rows = []
    cols = ["mode", "decode_tok_s", "prefill_tok_s", "peak_gpu_GB", "peak_vs_gpu_only", "bytes_per_token_MB",
            "h2d_GB_s", "h2d_frac_of_pinned", "recall", "hit_rate", "wasted_MB_per_token", "x_on_demand", "x_lru",
            "x_accelerate_cpu_offload", "exact_vs_gpu_only"]

    def save():  # after every row, so a run cut short still leaves what it measured
        derive(rows, settings["pinned_h2d_GB_s"])
        write_results(a.name or f"moe_offload_{a.shape}", rows, settings, a.out, columns=cols)

    def add(name, row, logits, ref):
        row = {"mode": name, **row}
        if ref is not None:
            k = min(len(ref), len(logits))
            row["exact_vs_gpu_only"] = bool(torch.equal(logits[:k], ref[:k]))
        rows.append(row)
        print_rows([row])
        save()

    r, ref = measure(model, prompt, decode_ids, a.device, a.warm_steps)
    add("gpu_only_eager", r, ref, None)
    model.set_experts_implementation("grouped_mm" if torch.device(a.device).type == "cuda" else "eager")
    r, lg = measure(model, prompt, decode_ids, a.device, a.warm_steps)
    add("gpu_only_" + model.config._experts_implementation, r, lg, None)
    model.set_experts_implementation("eager")
    add_pregates(model)
    off = enable_pregated_offload(model, gpu_budget_gb=budget_gb, mode="on_demand")
    settings["slots_per_layer"] = off.slots_per_layer
    settings["cache_GB"] = off.gpu_bytes() / 1e9
    for mode in MODES:
        off.set_mode(mode)
        off.reset_stats()
        r, lg = measure(model, prompt, decode_ids, a.device, a.warm_steps, offload=off)
        add(mode, r, lg, ref if mode != "pregated" else None)
    off.disable()
    if torch.device(a.device).type == "cuda":
        from accelerate import cpu_offload

        for l in layers:
            cpu_offload(l.experts, execution_device=torch.device(a.device))
        r, lg = measure(model, prompt, decode_ids[:a.warm_steps + a.accelerate_decode], a.device, a.warm_steps)
        add("accelerate_cpu_offload", r, lg, ref)

    save()


def derive(rows: list[dict], pinned_gbs: float | None) -> None:
    by = {r["mode"]: r for r in rows}
    gpu_peak = by.get("gpu_only_eager", {}).get("peak_gpu_GB")
    for r in rows:
        for base in ("on_demand", "lru", "accelerate_cpu_offload"):
            if base in by and r["mode"] in ("speculative", "pregated"):
                r[f"x_{base}"] = r["decode_tok_s"] / by[base]["decode_tok_s"]
        if gpu_peak and r.get("peak_gpu_GB"):
            r["peak_vs_gpu_only"] = r["peak_gpu_GB"] / gpu_peak
        if pinned_gbs and r.get("h2d_GB_s") is not None:
            r["h2d_frac_of_pinned"] = r["h2d_GB_s"] / pinned_gbs

if __name__ == "__main__":
    main()
