"""End-to-end decode speed of a random Llama-2-7B-shaped model: bf16 vs AFPQ W4 (our kernels) vs tinygemm int4.

Run: ``python -m benchmarks.quant_e2e [--out DIR] [--new-tokens 128]`` (CUDA). Batch 1, greedy, 128 new
tokens after a 16-token prompt; tokens/s of the decode loop only.

The model is a minimal Llama decoder with Llama-2-7B's shapes (32 layers, hidden 4096, 32 heads,
MLP 11008, vocab 32000; RMSNorm, rotary embeddings, SDPA attention over a static KV cache, SwiGLU),
built directly on the GPU with random weights. Only its seven projection layers per block change
between variants: ``nn.Linear`` bf16 (cuBLAS), :class:`~hf_efficient.quantization.QuantLinear` with AFPQ
formats at group 128 (our kernels through the registered CUDA fast path, exactly what a quantized
HF model runs), and torch's int4 tinygemm (``_weight_int4pack_mm``, group 128). The embedding and the LM
head stay bf16 in all variants. Every variant gets the same treatment: one decode step (including the
greedy argmax feeding the next step) is captured in a CUDA graph and replayed, so the host never limits
the speed. (HF's own module is not used because capturing it needs torch.compile, whose compile time
does not fit the device budget; its layer shapes and per-token work are the same.)
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import child_result, print_rows, run_child, write_results

CFG = dict(layers=32, hidden=4096, heads=32, mlp=11008, vocab=32000)
GROUP = 128


class TinyGemmLinear(nn.Module):
    """Random int4 weights in tinygemm's layout (group 128, bf16 scales/zeros)."""

    def __init__(self, k, n):
        super().__init__()
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        self.register_buffer("w", torch._convert_weight_to_int4pack(q, 8))
        self.register_buffer("sz", torch.rand(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01)
        self.n = n

    def forward(self, x):
        return torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.w, GROUP, self.sz).view(*x.shape[:-1], self.n)


def make_linear(kind: str, k: int, n: int) -> nn.Module:
    if kind == "bf16":
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        nn.init.normal_(lin.weight, std=0.02)
        return lin
    if kind == "tinygemm":
        return TinyGemmLinear(k, n)
    from hf_efficient.quantization import QuantLinear

    q = QuantLinear(k, n, kind.split("@")[0], GROUP, device="cuda")
    q.qweight.random_(-2 ** 31, 2 ** 31 - 1)  # every 4-bit code is valid in these formats
    for p in q.fmt.param_names:
        t = getattr(q, p)
        if t.dtype == torch.uint8:
            t.random_(0, 2 ** q.fmt.bits)
        else:
            t.uniform_(1e-3, 2e-3)
    return q


class Block(nn.Module):
    def __init__(self, kind, max_len):
        super().__init__()
        h, m = CFG["hidden"], CFG["mlp"]
        self.q, self.k, self.v, self.o = (make_linear(kind, h, h) for _ in range(4))
        self.gate, self.up = make_linear(kind, h, m), make_linear(kind, h, m)
        self.down = make_linear(kind, m, h)
        self.n1 = nn.RMSNorm(h, device="cuda", dtype=torch.bfloat16)
        self.n2 = nn.RMSNorm(h, device="cuda", dtype=torch.bfloat16)
        hd = h // CFG["heads"]
        self.register_buffer("kc", torch.zeros(1, CFG["heads"], max_len, hd, device="cuda", dtype=torch.bfloat16))
        self.register_buffer("vc", torch.zeros_like(self.kc))

    def forward(self, x, pos, cos, sin, mask):
        b, t, h = x.shape
        nh = CFG["heads"]
        y = self.n1(x)
        q, k, v = (p(y).view(b, t, nh, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.kc.index_copy_(2, pos, k)
        self.vc.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.kc, self.vc, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, h))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Model(nn.Module):
    def __init__(self, kind, max_len):
        super().__init__()
        h, hd = CFG["hidden"], CFG["hidden"] // CFG["heads"]
        self.emb = nn.Embedding(CFG["vocab"], h, device="cuda", dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(kind, max_len) for _ in range(CFG["layers"]))
        self.norm = nn.RMSNorm(h, device="cuda", dtype=torch.bfloat16)
        self.head = make_linear("bf16", h, CFG["vocab"])
        inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, device="cuda").float() / hd)
        ang = torch.arange(max_len, device="cuda").float()[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().to(torch.bfloat16))
        self.register_buffer("sin", ang.sin().to(torch.bfloat16))
        self.max_len = max_len

    def forward(self, ids, pos):
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = (torch.arange(self.max_len, device=ids.device)[None, :] <= pos[:, None])[None, None]
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, pos, cos, sin, mask)
        return self.head(self.norm(x[:, -1]))


@torch.no_grad()
def decode_speed(kind: str, new_tokens: int, prompt: int = 16) -> dict:
    t0 = time.time()
    torch.manual_seed(0)
    model = Model(kind, prompt + new_tokens + 1).eval()
    layouts = None
    if kind not in ("bf16", "tinygemm"):
        from hf_efficient.quantization.gpu import force_kernel, prepare_model

        # "<fmt>@<kernel>" pins a layout (e.g. int4_asym@gemv: our Triton kernels where tinygemm is the default)
        with force_kernel(kind.split("@")[1] if "@" in kind else "auto"):
            prepare_model(model, torch.bfloat16)
        layouts = ",".join(sorted({m.layout.kind for m in model.modules() if getattr(m, "layout", None)}))
    build_s = time.time() - t0
    ids = torch.randint(0, CFG["vocab"], (1, prompt), device="cuda")
    logits = model(ids, torch.arange(prompt, device="cuda"))  # prefill (not timed); also autotunes
    tok = logits.argmax(-1, keepdim=True)
    pos = torch.tensor([prompt], device="cuda")

    def step():
        nxt = model(tok, pos).argmax(-1, keepdim=True)
        tok.copy_(nxt)
        pos.add_(1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up on a side stream before capture (autotuning, lazy init)
            step()
    torch.cuda.current_stream().wait_stream(s)
    pos.fill_(prompt)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    pos.fill_(prompt)
    g.replay()
    torch.cuda.synchronize()
    pos.fill_(prompt)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(new_tokens):
        g.replay()
    end.record()
    end.synchronize()
    sec = start.elapsed_time(end) / 1e3
    lin_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.split(".")[-1] in
                    ("_rl_qweight", "_rl_params", "_rl_sz", "_rl_scale", "w", "sz"))
    lin_bytes += sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if ".blocks." in f".{n}" and p.dim() == 2)
    out = {"model": kind, "tokens_per_s": new_tokens / sec, "ms_per_token": 1e3 * sec / new_tokens,
           "linear_weight_GB": lin_bytes / 1e9, "build_s": build_s, "layouts": layouts}
    del model, g
    torch.cuda.empty_cache()
    return out


HF_CONFIGS = {"hf-bf16": None, "hf-int4_asym": dict(bits=4, group_size=128, fmt="int"),
              "hf-nf4_asym": dict(bits=4, group_size=128, fmt="nf"), "hf-fp4_asym": dict(bits=4, group_size=128, fmt="fp")}


class _RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past that limit a frame runs eagerly, without the
    CUDA graphs this path is meant to time."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record):
        self.hits += "recompile_limit" in record.getMessage()


@torch.no_grad()
def hf_generate_speed(kind: str, path: str, new_tokens: int, prompt: int = 16) -> dict:
    """The user's path: ``from_pretrained(path, quantization_config=...)`` then ``generate`` with a static cache,
    which makes transformers compile the forward itself (its default compile config: CUDA graphs), timed after two
    warm-up generates. Run it in a fresh process (``main`` does): dynamo's caches and the CUDA allocator are per
    process, so a row timed after others in one process could reuse their compiled graphs, or run eagerly past
    dynamo's recompile limit. ``compiled`` says whether generate took the compiled path (a quantizer that is not
    ``is_compileable`` keeps it eager); ``dynamo_graphs`` and ``recompile_limit_hits`` say what dynamo did."""
    from torch._dynamo.utils import counters

    hits = _RecompileLimitHits()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(hits)
    try:
        return _hf_generate_row(kind, path, new_tokens, prompt) | {
            "dynamo_graphs": counters["stats"]["unique_graphs"], "recompile_limit_hits": hits.hits}
    finally:
        dynamo_log.removeHandler(hits)


def _hf_generate_row(kind: str, path: str, new_tokens: int, prompt: int) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_efficient import AFPQConfig

    t0 = time.time()
    cfg = HF_CONFIGS[kind]
    q = {"quantization_config": AFPQConfig(**cfg)} if cfg else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", **q).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    for _ in range(2):  # compile + capture
        model.generate(ids, **gen)
    build_s = time.time() - t0
    torch.cuda.synchronize()
    t = time.time()
    model.generate(ids, **gen)
    torch.cuda.synchronize()
    sec = time.time() - t
    kinds = sorted({m.layout.kind for m in model.modules() if getattr(m, "layout", None) is not None})
    return {"model": kind, "tokens_per_s": new_tokens / sec, "ms_per_token": 1e3 * sec / new_tokens,
            "linear_weight_GB": None, "build_s": build_s, "layouts": ",".join(kinds) or None,
            "layers": model.config.num_hidden_layers, "compiled": hasattr(model, "_compiled_call")}


def _add_ratios(rows: list[dict]) -> None:
    """x_vs_bf16 / x_vs_tinygemm against the row of the same path (graph or HF) and, for HF rows, the same
    checkpoint depth."""
    base = {(r["model"], r.get("layers")): r["tokens_per_s"] for r in rows}
    for r in rows:
        hf = r["model"].startswith("hf-")
        ref = base.get(("hf-bf16" if hf else "bf16", r.get("layers")))
        r["x_vs_bf16"] = r["tokens_per_s"] / ref if ref else None
        tg = base.get(("tinygemm", r.get("layers")))
        r["x_vs_tinygemm"] = r["tokens_per_s"] / tg if tg and not hf else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kinds", default="bf16,tinygemm,fp4_asym,nf4_asym,int4_asym,int4_asym@gemv")
    ap.add_argument("--hf-dir", default=None, help="also time HF generate (static cache + torch.compile) on this "
                    "bf16 checkpoint (e.g. the one benchmarks.quant_load_memory writes), each kind in its own process")
    ap.add_argument("--hf-kinds", default=",".join(HF_CONFIGS))
    ap.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_e2e needs CUDA")
    if args.hf_child:
        child_result(hf_generate_speed(args.hf_child, args.hf_dir, args.new_tokens))
        return
    rows = []
    jobs = [(k, lambda k=k: decode_speed(k, args.new_tokens)) for k in args.kinds.split(",") if k]
    if args.hf_dir:
        jobs += [(k, lambda k=k: run_child("benchmarks.quant_e2e", "--hf-dir", args.hf_dir, "--hf-child", k,
                                           "--new-tokens", str(args.new_tokens)))
                 for k in args.hf_kinds.split(",") if k]
    for kind, job in jobs:
        try:
            r = job()
        except Exception as e:  # noqa: BLE001
            print(f"{kind} failed: {e!r}"[:400], flush=True)
            continue
        if r is None:
            continue
        rows.append(r)
        _add_ratios(rows)
        print_rows(rows[-1:])
        write_results("quant_e2e", rows, {"model": "Llama-2-7B-shaped, random weights (hf-* rows: the --hf-dir "
                                          "checkpoint through from_pretrained + generate, one process per row)",
                                          "batch": 1, "prompt": 16, "new_tokens": args.new_tokens,
                                          "group_size": GROUP, "timing": "one CUDA graph per decode step, replayed"},
                      args.out)


if __name__ == "__main__":
    main()
