"""BitDistiller on the embedded model: perplexity on the held-out plays, arm by arm, in one run.

Arms per setting (bits × group size × format), all measured in this run on the same evaluation tokens:
``rtn`` (round-to-nearest), ``clip`` (asymmetric clipping init, no training), ``gptq`` (our GPTQ), then
quantization-aware training from the clipped weights with each loss (``ce``, ``fkl``, ``rkl``, ``cakld``) on
the *same* teacher-generated text for the same steps, and ``fp32_ce`` (the float model fine-tuned with CE on
that text: the control that says how much is plain domain fine-tuning). Each row has ``ppl``, ``fp32_ppl``,
their ratio and the top-1 agreement with the float model on the evaluation tokens. The CAKLD model is
exported to a packed checkpoint and re-evaluated after reloading it (``cakld_export``).

    python -m benchmarks.bitdistiller                           # CPU quick run (few steps)
    python -m benchmarks.bitdistiller --device cuda --steps 400 --samples 2048 --gen-len 256 --clip-grid 10

Perplexity here uses non-overlapping windows of ``--context`` tokens (each scores its tokens 1..context-1),
the same windows for every arm, so that one pass gives perplexity and agreement.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import tempfile
import time

import torch

from benchmarks.common import write_results

ARMS = ("rtn", "clip", "gptq", "ce", "fkl", "rkl", "cakld", "fp32_ce")


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, context: int, ref_top1: list | None = None):
    """(perplexity, top-1 agreement with ``ref_top1``, this model's top-1 per window)."""
    model.eval()
    dev = next(model.parameters()).device
    nll, n, agree, tops = 0.0, 0, 0, []
    for i, s in enumerate(range(0, ids.numel() - 1, context)):
        w = ids[s: s + context].to(dev)[None]
        if w.shape[1] < 2:
            break
        logits = model(w).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
        top = logits.argmax(-1).cpu()
        tops.append(top)
        if ref_top1 is not None:
            agree += (top == ref_top1[i]).sum().item()
    return math.exp(nll / n), (agree / n if ref_top1 is not None else 1.0), tops


def training_data(model, tok, args):
    """Teacher-generated sequences, cached on disk by their settings (every arm reads the same file)."""
    import datasets

    from hf_efficient.distill import generate_training_data
    from hf_efficient.models import cache_dir

    key = hashlib.sha256(json.dumps([args.samples, args.prompt_len, args.gen_len, args.seed, 0.7]).encode()
                         ).hexdigest()[:12]
    path = cache_dir() / "distill_data" / key
    if (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path)), 0.0
    t0 = time.perf_counter()
    ds = generate_training_data(model, tok, n_samples=args.samples, prompt_len=args.prompt_len,
                                gen_len=args.gen_len, batch_size=args.gen_batch, seed=args.seed)
    secs = time.perf_counter() - t0
    ds.save_to_disk(str(path))
    return ds, secs


def train(model, teacher, ds, cfg, args, loss: str):
    """Train ``model`` (float, clipped, not yet fake-quantized; or float for fp32_ce) with Trainer."""
    from transformers import Trainer, TrainingArguments

    from hf_efficient.distill import BitDistillerCallback
    from hf_efficient.evaluation import PeakMemory

    train_ds = ds.remove_columns([c for c in ds.column_names if c != "input_ids"])
    train_ds = train_ds.map(lambda r: {"labels": r["input_ids"]})
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                  learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                                  weight_decay=0.0, max_grad_norm=1.0, report_to=[], save_strategy="no",
                                  logging_steps=max(1, args.steps // 10), disable_tqdm=False, seed=args.seed,
                                  use_cpu=args.device == "cpu", bf16=args.bf16, dataloader_num_workers=0)
        callbacks = [] if cfg is None else [BitDistillerCallback(cfg, teacher=teacher)]
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks)
        with PeakMemory(args.device) as mem:
            t0 = time.perf_counter()
            trainer.train()
            secs = time.perf_counter() - t0
    beta = callbacks[0].beta if callbacks else None
    return secs, mem.peak_bytes / 2**20, beta


def run(args) -> list[dict]:
    from hf_efficient.data import token_ids
    from hf_efficient.distill import BitDistillerConfig, convert, init_clipping, prepare_qat
    from hf_efficient.evaluation import dir_weight_bytes
    from hf_efficient.models import load_default
    from hf_efficient.quantization.api import calibration_windows, quantize_model

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # on a shared, loaded CPU one thread beats two fighting ones
    fp, tok = load_default(device=args.device)
    eval_ids = token_ids(tok, "eval", args.eval_tokens)
    fp_ppl, _, ref_top1 = evaluate(fp, eval_ids, args.context)
    print(f"fp32: ppl {fp_ppl:.2f}")
    ds, gen_secs = training_data(fp, tok, args)
    tokens = args.steps * args.batch * (args.prompt_len + args.gen_len)
    rows = [dict(method="fp32", bits=32, group_size=None, fmt="fp32", ppl=fp_ppl, fp32_ppl=fp_ppl, ratio=1.0,
                 top1_agreement=1.0)]

    def add(method, setting, model, **extra):
        ppl, agree, _ = evaluate(model, eval_ids, args.context, ref_top1)
        r = dict(method=method, bits=setting[1], group_size=setting[2], fmt=f"{setting[0]}{setting[1]}_asym",
                 ppl=ppl, fp32_ppl=fp_ppl, ratio=ppl / fp_ppl, top1_agreement=agree, **extra)
        rows.append(r)
        print(f"{r['fmt']} g{setting[2]} {method:12s} ppl {ppl:12.2f} ({ppl / fp_ppl:.3f}x fp32)  "
              f"top-1 agreement {agree:.3f}  {extra}", flush=True)
        return r

    arms = [a for a in args.arms.split(",")]
    for spec in args.settings.split(","):
        fmt, bits, gs = _parse_setting(spec)
        cfg = BitDistillerConfig(bits=bits, group_size=gs, fmt=fmt, clip=False, clip_grid=args.clip_grid,
                                 clip_samples=args.clip_samples, clip_seqlen=args.prompt_len + args.gen_len)
        setting = (fmt, bits, gs)
        if "rtn" in arms:
            add("rtn", setting, prepare_qat(copy.deepcopy(fp), cfg))
        clipped = copy.deepcopy(fp)
        calib = torch.tensor(ds["input_ids"][: args.clip_samples])
        t0 = time.perf_counter()
        init_clipping(clipped, cfg, calib)
        clip_secs = time.perf_counter() - t0
        if "clip" in arms:
            add("clip", setting, prepare_qat(copy.deepcopy(clipped), cfg), clip_seconds=round(clip_secs, 1))
        if "gptq" in arms:
            qc = cfg.to_quant_config()
            qc.algorithm = "gptq"
            windows = calibration_windows(tok, args.gptq_samples, args.gptq_seqlen, args.seed)
            add("gptq", setting, quantize_model(copy.deepcopy(fp), qc, windows.to(args.device)))
        for loss in [a for a in arms if a in ("ce", "fkl", "rkl", "cakld")]:
            model = copy.deepcopy(clipped)
            secs, peak, beta = train(model, fp, ds, BitDistillerConfig(**{**cfg.to_dict(), "loss": loss}), args, loss)
            extra = dict(train_seconds=round(secs, 1), peak_mb=round(peak), tokens=tokens)
            if beta is not None:
                extra["beta"] = round(beta, 4)
            add(loss, setting, model, **extra)
            if loss == "cakld" and args.export:
                from transformers import AutoModelForCausalLM

                convert(model, cfg)
                with tempfile.TemporaryDirectory() as d:
                    model.save_pretrained(d)
                    size = dir_weight_bytes(d)
                    reloaded = AutoModelForCausalLM.from_pretrained(d).to(args.device)
                    add("cakld_export", setting, reloaded, checkpoint_mb=round(size / 2**20, 1))
            del model
    if "fp32_ce" in arms:
        model = copy.deepcopy(fp).requires_grad_(True)  # the callbacks froze fp as their teacher
        secs, peak, _ = train(model, None, ds, None, args, "ce")
        ppl, agree, _ = evaluate(model, eval_ids, args.context, ref_top1)
        rows.append(dict(method="fp32_ce", bits=32, group_size=None, fmt="fp32", ppl=ppl, fp32_ppl=fp_ppl,
                         ratio=ppl / fp_ppl, top1_agreement=agree, train_seconds=round(secs, 1),
                         peak_mb=round(peak), tokens=tokens))
        print(f"fp32 fine-tuned with CE: ppl {ppl:.2f}", flush=True)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(generation_seconds=round(gen_secs, 1), train_tokens_per_arm=tokens,
                    ppl_protocol=f"non-overlapping windows of {args.context} tokens over {args.eval_tokens} "
                                 f"held-out tokens")
    write_results(args.name, rows, settings,
                  columns=["method", "fmt", "group_size", "ppl", "fp32_ppl", "ratio", "top1_agreement",
                           "train_seconds", "peak_mb", "tokens"])
    return rows


def _parse_setting(spec: str):
    """``int2g64`` -> ("int", 2, 64)."""
    import re

    m = re.fullmatch(r"(int|nf|fp)(\d)g(\d+)", spec.strip())
    if not m:
        raise ValueError(f"--settings entry {spec!r} must look like int2g64 or nf3g128")
    return m.group(1), int(m.group(2)), int(m.group(3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", default="int2g64", help="comma list like int2g64,int3g128,nf3g128,int4g128")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--samples", type=int, default=64, help="teacher-generated sequences")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=112)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--clip-grid", type=int, default=6)
    p.add_argument("--clip-samples", type=int, default=8)
    p.add_argument("--gptq-samples", type=int, default=16)
    p.add_argument("--gptq-seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads")
    p.add_argument("--no-export", dest="export", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="bitdistiller")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
