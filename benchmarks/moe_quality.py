"""Quality of pre-gated routing on a real MoE: the embedded SmolLM2-135M MoEfied into 16 experts (top-4).

Rows, all on the same held-out tokens (the eval plays): the dense model; the MoEfied model with its own routers;
pre-gated routing with training-free next-gate pre-gates (copies of the next router applied to this layer's input);
pre-gated routing after top-k distillation; optionally after end-to-end training through Trainer. Recall at k:
share of layer i+1's true top-k experts (its own router on its own input) that each predictor names, on eval
windows with the model's own routing.

    python -m benchmarks.moe_quality --eval-tokens 1024 --context 512
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_rows, write_results
from hf_efficient.data import sample_windows, token_ids
from hf_efficient.evaluation import perplexity
from hf_efficient.models import load_default
from hf_efficient.moe import add_pregates, distill_pregates, enable_pregated_routing, pregate_recall, train_pregates
from hf_efficient.moe.moefy import moefy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=8, help="256-token train windows fitting the routers")
    ap.add_argument("--distill-windows", type=int, default=8, help="256-token train windows for distillation")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--e2e-steps", type=int, default=0, help="end-to-end Trainer steps after distillation")
    ap.add_argument("--no-ppl", action="store_true", help="recall only (perplexity runs are the slow part on CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense, tok = load_default()
    ev = token_ids(tok, "eval", max_tokens=a.eval_tokens)
    tr = token_ids(tok, "train", max_tokens=400_000)
    settings = dict(ppl_measured=not a.no_ppl, eval_tokens=ev.numel(), context=a.context, experts=a.experts,
                    top_k=a.top_k,
                    calib_windows=a.calib_windows, distill_windows=a.distill_windows, distill_steps=a.distill_steps,
                    e2e_steps=a.e2e_steps, threads=a.threads, model="SmolLM2-135M-Instruct (embedded), MoEfied")
    rows, t0 = [], time.time()

    def add(name, ppl, **kw):
        rows.append({"variant": name, "ppl": ppl, **kw, "elapsed_s": time.time() - t0})
        own = next((r["ppl"] for r in rows if r["variant"] == "moe_own_routers"), None)
        own = None if own is None or own != own else own  # NaN when perplexity was skipped
        for r in rows:
            if own:
                r["vs_moe_own_pct"] = 100 * (r["ppl"] / own - 1)
        print_rows(rows[-1:])
        write_results("moe_quality", rows, settings, a.out,
                      columns=["variant", "ppl", "vs_moe_own_pct", "recall_at_k", "elapsed_s"])

    def ppl(m):
        return float("nan") if a.no_ppl else perplexity(m, ev, context=a.context, progress=False)
    with torch.no_grad():
        add("dense", ppl(dense))
        moe = moefy(dense, a.experts, a.top_k, sample_windows(tr, a.calib_windows, 256, seed=1), progress=False)
        moe.set_experts_implementation("eager")
        del dense
        add("moe_own_routers", ppl(moe))
    add_pregates(moe)
    rec_windows = sample_windows(ev, 4, 256, seed=2).split(1)

    def pregated_row(name):
        rec = pregate_recall(moe, rec_windows)
        hooks = enable_pregated_routing(moe)
        with torch.no_grad():
            p = ppl(moe)
        hooks.remove()
        add(name, p, recall_at_k=rec["pregate"])
        return rec

    rec = pregated_row("pregated_next_gate (training-free)")
    settings["next_router_recall_at_k"] = rec["next_router"]
    losses = distill_pregates(moe, sample_windows(tr, a.distill_windows, 256, seed=3).split(2), steps=a.distill_steps,
                              lr=1e-3, progress=False)
    settings["distill_loss_first_last"] = [losses[0], losses[-1]]
    pregated_row("pregated_distilled")
    if a.e2e_steps:
        import tempfile

        from transformers import TrainingArguments

        wins = sample_windows(tr, 4 * a.e2e_steps, 256, seed=4)
        ds = [{"input_ids": w, "labels": w} for w in wins]
        with tempfile.TemporaryDirectory() as d:
            args = TrainingArguments(output_dir=d, max_steps=a.e2e_steps, per_device_train_batch_size=4,
                                     learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                                     logging_steps=max(1, a.e2e_steps // 5), disable_tqdm=True)
            train_pregates(moe, ds, args)
        pregated_row("pregated_distilled_e2e")


if __name__ == "__main__":
    main()
