"""Does GPTQ calibrated on one domain over-fit it? Layer-output error of GPTQ vs RTN on plays and on news.

For linears of a few decoder layers of the embedded model (float model, no earlier layer quantized), the input
Hessians are collected on three texts: training plays (the calibration domain), news documents A and news
documents B (disjoint halves of the Lee corpus, ``hf_efficient.data.news_text``). Each linear is quantized by
RTN and by GPTQ with the plays Hessian (damp 0.01 and 0.1) and with a mixed Hessian (plays + news A), and the
layer-output error ``tr(ΔW H ΔWᵀ) / N`` is measured on plays and on news B (held out). A ratio GPTQ/RTN below
1 means GPTQ helps on that text. ``end_codes`` is the fraction of INT codes at the grid ends (0 or 15): the
share of weights that GPTQ's updates pushed into clamping.

Run: ``python -m benchmarks.gptq_domain_probe`` (writes ``benchmarks/results/gptq_domain_probe.{json,md}``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import write_results
from hf_efficient import formats
from hf_efficient.data import news_text, sample_windows, token_ids
from hf_efficient.models import load_default
from hf_efficient.quantization.gptq import HessianAccumulator, gptq_quantize
from hf_efficient.quantization.linear import rtn_quantize
from hf_efficient.quantization.packing import expand_groups

LINEARS = [("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")]


@torch.no_grad()
def _hessians(model, names, windows):
    acc = {k: HessianAccumulator(v.in_features) for k, v in names.items()}
    hooks = [v.register_forward_pre_hook(lambda mod, a, _k=k: acc[_k].add(a[0])) for k, v in names.items()]
    try:
        for w in windows:
            model.model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: a.H for k, a in acc.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3,20")
    ap.add_argument("--formats", default="int4_asym,nf4_asym,fp4_asym")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = load_default()
    plays = sample_windows(token_ids(tok, "train", 60000), 8, 256, 0)
    news = tok(news_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    news_a, news_b = sample_windows(news[:40000], 4, 256, 1), sample_windows(news[40000:], 4, 256, 2)
    names = {f"{layer}.{n}": getattr(getattr(model.model.layers[layer], a), n)
             for layer in map(int, args.layers.split(",")) for a, n in LINEARS}
    Hp, Hn, Ha = _hessians(model, names, plays), _hessians(model, names, news_b), _hessians(model, names, news_a)
    err = lambda d, H: (d @ H * d).sum().item() / d.shape[0]  # noqa: E731
    settings = {"calibration": "8 x 256 tokens of training plays", "held_out_news": "4 x 256 tokens (news B)",
                "mixed": "(H_plays + H_newsA) / 2", "group_size": args.group_size,
                "command": "python -m benchmarks.gptq_domain_probe " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows = []
    for name in args.formats.split(","):
        fmt = formats.get_format(name)
        for k, lin in names.items():
            W = lin.weight.detach().float()
            g = args.group_size
            deq = lambda c, p: formats.decode(fmt, c, {q: expand_groups(v, W.shape[1], g)  # noqa: E731
                                                       for q, v in p.items()}) - W
            dr = deq(*rtn_quantize(W, fmt, g, torch.float16))
            rc = rtn_quantize(W, fmt, g, torch.float16)[0]
            gc, gp = gptq_quantize(W, Hp[k], fmt, g)
            dg = deq(gc, gp)
            dd = deq(*gptq_quantize(W, Hp[k], fmt, g, damp=0.1))
            dm = deq(*gptq_quantize(W, (Hp[k] + Ha[k]) / 2, fmt, g))
            ends = (lambda c: ((c == 0) | (c == 2 ** fmt.bits - 1)).float().mean().item()) \
                if fmt.scheme == "zero_point" else (lambda c: None)
            r = {"format": name, "linear": k, "plays_gptq_over_rtn": err(dg, Hp[k]) / err(dr, Hp[k]),
                 "news_gptq_over_rtn": err(dg, Hn[k]) / err(dr, Hn[k]),
                 "news_gptq_damp0.1_over_rtn": err(dd, Hn[k]) / err(dr, Hn[k]),
                 "news_gptq_mixed_over_rtn": err(dm, Hn[k]) / err(dr, Hn[k]),
                 "end_codes_rtn": ends(rc), "end_codes_gptq": ends(gc)}  # None: not an INT format
            rows.append(r)
            print("  ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in r.items()), flush=True)
            write_results("gptq_domain_probe", rows, settings, args.out)


if __name__ == "__main__":
    main()
