"""Perplexity under SeerAttention sparse decode (CPU): what the decode-time block selection costs in quality.

The embedded SmolLM2-135M with trained gates reads a held-out prompt densely (SDPA prefill), then decodes the
next ``--decode`` tokens one at a time with teacher forcing (each step is fed the true token and scores the
next one), all on one KV cache. Every setting starts from the same prefill cache, so the rows differ only in the
decode attention:

* ``dense``: exact SDPA (the default ``decode="dense"``);
* ``sparse_kv`` / ``sparse``: the trained gate picks the KV blocks of each step (one pick per KV head / per query
  head) at the given sparsity, first and last blocks always kept;
* ``sink+recent``: the same budget spent on the first block and the most recent ones, no gate (the trivial rule
  the gate has to beat).

Run: ``nice python -m benchmarks.seer_decode_ppl --gates DIR [--context 8192 --decode 128 --windows 4]`` with gates
from ``benchmarks/seer_quality.py`` (trained at the same context). Writes ``seer_decode_ppl_cpu.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from benchmarks.common import print_rows, write_results
from hf_efficient.evaluation import cache_kwarg

_RECENT = {"sparsity": 0.0, "block": 64}


def sink_recent_decode(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One decode step over the first block and the most recent blocks (budget as SeerAttention's 'sparsity')."""
    from hf_efficient.kernels import seer_reference as ref

    sq, sk, blk = query.shape[2], key.shape[2], _RECENT["block"]
    if sq != 1:
        raise ValueError("sink_recent_decode scores single-token decode steps only (prefill runs SDPA)")
    mask = ref.sink_recent_block_mask(query.shape[:2], sq, sk, sparsity=_RECENT["sparsity"], block=blk,
                                      device=query.device)
    out = ref.attention_reference(query, key, value, causal=True, scale=scaling, block_mask=mask, block=blk)
    return out.transpose(1, 2), None


def decode_nll(model, ids: torch.Tensor, cache, first_logits: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ``ids[1:]`` decoding one token at a time from ``cache`` (``first_logits`` scores ids[0])."""
    nll = torch.nn.functional.cross_entropy(first_logits.float(), ids[:1], reduction="sum").item()
    name = cache_kwarg()
    with torch.no_grad():
        for t in range(ids.numel() - 1):
            out = model(input_ids=ids[None, t:t + 1], use_cache=True, **{name: cache})
            nll += torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[t + 1:t + 2],
                                                     reduction="sum").item()
    return nll, ids.numel()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gates", required=True, help="trained gates folder (benchmarks/seer_quality.py saves them)")
    ap.add_argument("--context", type=int, default=8192, help="prompt + decoded tokens per window")
    ap.add_argument("--decode", type=int, default=128, help="tokens decoded (and scored) per window")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows (consecutive, non-overlapping)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 0 < args.decode < args.context:
        raise SystemExit(f"--decode must be in (0, --context={args.context}), got {args.decode}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    import hf_efficient  # noqa: F401  (registers seer_attention)
    from hf_efficient.attention.seer import configure, gates_of, load_gates
    from hf_efficient.attention.seer.decode import reset_decode_cache
    from hf_efficient.data import token_ids
    from hf_efficient.models import load_default

    model, tok = load_default(dtype=torch.float32)
    cfg = load_gates(model, args.gates)
    _RECENT["block"] = cfg.block_size
    AttentionInterface.register("sink_recent_decode", sink_recent_decode)
    AttentionMaskInterface.register("sink_recent_decode", sdpa_mask)
    ids = token_ids(tok, "eval", args.context * args.windows)
    if ids.numel() < args.context * args.windows:
        raise SystemExit(f"the eval split has {ids.numel()} tokens, fewer than {args.context * args.windows}")
    sps = [float(s) for s in args.sparsities.split(",")]
    settings_list = [("dense", None)] + [(m, sp) for sp in sps for m in ("sparse_kv", "sparse", "sink+recent")]
    sums = {s: [0.0, 0] for s in settings_list}
    t0 = time.perf_counter()
    prompt = args.context - args.decode
    for w in range(args.windows):
        win = ids[w * args.context:(w + 1) * args.context]
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            out = model(input_ids=win[None, :prompt], use_cache=True)
        prefill_cache, first = getattr(out, cache_kwarg()), out.logits[0, -1:]
        for mode, sp in settings_list:
            if mode == "sink+recent":
                _RECENT["sparsity"] = sp
                model.set_attn_implementation("sink_recent_decode")
            else:
                configure(model, decode=mode, **({} if sp is None else {"sparsity": sp}))
                model.set_attn_implementation("seer_attention")
                for g in gates_of(model):
                    reset_decode_cache(g)
            nll, n = decode_nll(model, win[prompt:], copy.deepcopy(prefill_cache), first)
            sums[(mode, sp)][0] += nll
            sums[(mode, sp)][1] += n
        print(f"window {w + 1}/{args.windows} done, {time.perf_counter() - t0:.0f} s", flush=True)
    dense_ppl = math.exp(sums[("dense", None)][0] / sums[("dense", None)][1])
    rows = []
    for (mode, sp), (nll, n) in sums.items():
        ppl = math.exp(nll / n)
        rows.append({"decode": mode, "sparsity": sp if sp is not None else 0.0, "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / dense_ppl - 1), "tokens": n})
    print_rows(rows)
    write_results("seer_decode_ppl_cpu", rows, {
        "model": "SmolLM2-135M-Instruct (embedded), fp32", "gates": args.gates, "block": cfg.block_size,
        "context": args.context, "decoded_tokens_per_window": args.decode, "windows": args.windows,
        "prefill": "dense SDPA, shared by every row", "seconds": time.perf_counter() - t0}, args.out)


if __name__ == "__main__":
    main()
