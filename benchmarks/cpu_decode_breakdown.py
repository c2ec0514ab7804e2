"""Where one decode step of the embedded model spends its time on the CPU: kernels, other ops, framework.

For each row (fp32; LUT INT4 g128; LUT INT4 g128 + INT4 g32 head on the kernels; each without and with the
fused decode step) and thread count: a random
16-token prompt is prefilled, then ``--steps`` single-token forwards on its KV cache are timed twice:
plain (``wall_ms`` per token, the number that counts) and under ``torch.profiler`` (per-op self CPU time).
Self times are grouped into

* ``lut_kernels``: ``hf_efficient::lut_gemm`` (tables + LUT GEMV, our C++);
* ``fused_step``: the fused decode step's ops (``decode_attn_in``, ``decode_attn_out_mlp``: a whole decoder
  layer's norms, projections, rotary, attention and MLP in C++; ``decode_layers``: all layers and their
  ``DynamicCache`` appends in one call; ``decode_linear``: a float32 output head's GEMV;
  rows named ``... fused``, see :func:`hf_efficient.quantization.lut.enable_fast_decode`);
* ``float_matmul``: ``aten::mm/addmm/bmm/linear``-family self time (BLAS; the fp32 row's linears, the float head);
* ``attention``: ``scaled_dot_product_attention`` and its CPU kernels;
* ``other_ops``: every other ATen op (norms, rotary, SiLU, adds, cache updates, copies, argmax ...);
* ``framework``: profiled wall minus all op self time: Python, transformers' module code, dispatch.

Only the decode steps are profiled (the prefill runs before the profiler starts). The profiled wall is
longer than the plain one (the profiler's own cost lands mostly in ``framework``), so the columns are also given as shares of the profiled wall; ``n_ops`` counts ATen/custom op calls per token.

Run: ``python -m benchmarks.cpu_decode_breakdown [--threads 1 2] [--steps 16] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_rows, write_results
from hf_efficient.evaluation import decode_steps

GROUPS = {
    "lut_kernels": ("hf_efficient::lut_gemm",),
    "fused_step": ("hf_efficient::decode_attn_in", "hf_efficient::decode_attn_out_mlp", "hf_efficient::decode_linear",
                   "hf_efficient::decode_layers"),
    "float_matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::_addmm_activation",
                     "aten::mv", "aten::addmv_", "aten::addmv"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math"),
}


def _decode(model, ids, steps, prof=None):
    """Seconds for ``steps`` one-token forwards after a prefill of ``ids``; ``prof`` (a torch.profiler context)
    covers only those steps."""
    import contextlib

    out = model(ids, use_cache=True)
    with prof if prof is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        decode_steps(model, ids, steps, out)
        return time.perf_counter() - t0


def breakdown(model, steps: int, threads: int, seed: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ids = torch.randint(100, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            _decode(model, ids, 2)  # warm-up (layer conversion, allocator)
            wall = min(_decode(model, ids, steps) for _ in range(3)) / steps
            prof = profile(activities=[ProfilerActivity.CPU])
            t_prof = _decode(model, ids, steps, prof) / steps
    finally:
        torch.set_num_threads(old)
    sums = {k: 0.0 for k in [*GROUPS, "other_ops"]}
    n_ops = 0
    for e in prof.key_averages():
        if not (e.key.startswith("aten::") or e.key.startswith("hf_efficient::")):
            continue
        n_ops += e.count
        g = next((k for k, names in GROUPS.items() if e.key in names), "other_ops")
        sums[g] += e.self_cpu_time_total / 1e3  # ms
    per_tok = {k: v / steps for k, v in sums.items()}
    framework = max(t_prof * 1e3 - sum(per_tok.values()), 0.0)
    row = {"threads": threads, "wall_ms": wall * 1e3, "tok_s": 1 / wall, "profiled_ms": t_prof * 1e3,
           **{f"{k}_ms": v for k, v in per_tok.items()}, "framework_ms": framework, "n_ops": n_ops / steps}
    for k in [*per_tok, "framework"]:
        row[f"{k}_share"] = row[f"{k}_ms"] / row["profiled_ms"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="cpu_decode_breakdown", help="result file name (one per machine kind)")
    args = ap.parse_args(argv)

    from benchmarks.cpu_threads import cpu_info
    from hf_efficient.models import load_model
    from hf_efficient.quantization.lut import LUTConfig, enable_fast_decode, enable_lut

    rows = []
    for name in ("fp32", "lut-int4-g128", "lut-int4-g128 + head"):
        qc = None if name == "fp32" else LUTConfig(bits=4, group_size=128)
        model = load_model(None, dtype=torch.float32, quantization_config=qc)[0].eval()
        if name.endswith("head"):
            enable_lut(model, head_bits=4, head_group_size=32)
        # the same model without and with the fused decode step (LUT models load with it on)
        for fused in (False, True):
            switched = enable_fast_decode(model, fused)
            assert not fused or switched, "the fused decode step did not switch on"
            for threads in args.threads:
                r = {"name": name + (" fused" if fused else ""), **breakdown(model, args.steps, threads)}
                rows.append(r)
                print_rows([r])
        del model
    info = cpu_info()
    write_results(args.name, rows, {**info, "steps": args.steps, "prompt_len": 16,
                                                 "note": "per decode token; self CPU time per op group from "
                                                         "torch.profiler over the decode steps only; framework = profiled "
                                                         "wall - op self time"},
                  args.out, columns=["name", "threads", "wall_ms", "tok_s", "profiled_ms", "lut_kernels_ms",
                                     "fused_step_ms", "float_matmul_ms", "attention_ms", "other_ops_ms", "framework_ms",
                                     "framework_share", "n_ops"])


if __name__ == "__main__":
    main()
