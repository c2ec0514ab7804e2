"""L0 structured pruning of a Conformer-CTC (ParakeetForCTC) trained from scratch on synthetic speech.

One run: synthesise train (Shakespeare training plays, training voices) and test (held-out plays,
held-out voices) sets with espeak-ng; train a teacher; then at the same parameter count compare
  * ours: PruningTrainer (L0 gates + Lagrangian + layerwise distillation), physically pruned, fine-tuned;
  * magnitude: the same structures pruned by weight norm (uniform per group), fine-tuned for as many
    steps as ours used for pruning + fine-tuning;
  * scratch: the magnitude model's shapes, randomly initialised, trained as long as the teacher.
Reports params, WER/CER on the test set and batch-1 / batch-16 latency (median, interleaved repeats).

    python -m benchmarks.pruning_conformer                 # CPU defaults (small; minutes)
    python -m benchmarks.pruning_conformer --device cuda --teacher-steps 4000 --hidden 256 --layers 8
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import ParakeetCTCConfig, ParakeetFeatureExtractor, ParakeetForCTC, Trainer, TrainingArguments

from benchmarks.common import print_rows, write_results
from hf_efficient.pruning import (L0PruningConfig, PrunedParakeetForCTC, PruningTrainer, count_params,
                                  layout_from_model, magnitude_masks, prune_parakeet)
from hf_efficient.pruning.speech import (TEST_VOICES, TRAIN_VOICES, CharTokenizer, SpeechCollator, SpeechSpec,
                                         build_speech_dataset, char_error_rate, transcribe, word_error_rate)


def make_teacher_config(a, tok: CharTokenizer) -> ParakeetCTCConfig:
    enc = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
               intermediate_size=4 * a.hidden, subsampling_conv_channels=a.sub_channels, num_mel_bins=a.mels,
               subsampling_factor=4, conv_kernel_size=9, layerdrop=0.0, dropout=0.1, activation_dropout=0.1,
               attention_dropout=0.1)
    return ParakeetCTCConfig(vocab_size=tok.vocab_size, pad_token_id=tok.blank_id, encoder_config=enc)


def training_args(a, out: Path, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=a.batch,
                             learning_rate=lr, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear",
                             weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(1, steps // 10), report_to=[],
                             remove_unused_columns=False, save_strategy="no", disable_tqdm=not a.progress,
                             use_cpu=a.device == "cpu", seed=a.seed, dataloader_num_workers=0)


def train_ctc(model, a, train_ds, collator, steps: int, lr: float, tag: str):
    t0 = time.time()
    tr = Trainer(model=model, args=training_args(a, a.work / tag, steps, lr), train_dataset=train_ds,
                 data_collator=collator)
    tr.train()
    print(f"[{tag}] {steps} steps in {time.time() - t0:.0f} s; last logs "
          f"{[h.get('loss') for h in tr.state.log_history if 'loss' in h][-3:]}", flush=True)
    return model.eval()


def evaluate(model, test_ds, collator, a) -> dict:
    hyps = transcribe(model, test_ds, collator, batch_size=16)
    refs = list(test_ds["text"])
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps), "example": hyps[0]}


def latency(models: dict, a, fe, seconds: float = 2.0) -> dict:
    """Median ms per forward (batch 1 and 16 of ``seconds`` of audio), models timed round-robin."""
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    out = {}
    for bsz in (1, 16):
        audio = [torch.randn(int(seconds * 16000), generator=g).numpy() * 0.1 for _ in range(bsz)]
        feats = fe(audio, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        x, am = feats["input_features"].to(dev), feats["attention_mask"].to(dev)
        times = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                for _ in range(3):
                    m(input_features=x, attention_mask=am)
            for _ in range(a.repeats):
                for k, m in models.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    m(input_features=x, attention_mask=am)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t0)
        for k in models:
            out.setdefault(k, {})[f"latency_b{bsz}_ms"] = 1e3 * statistics.median(times[k])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-n", type=int, default=3000)
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sub-channels", type=int, default=32)
    p.add_argument("--mels", type=int, default=80)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=1200)
    p.add_argument("--prune-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a shared machine oversubscribes)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/pruning_conformer"))
    p.add_argument("--name", default="pruning_conformer")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    t_start = time.time()

    tok = CharTokenizer()
    fe = ParakeetFeatureExtractor(feature_size=a.mels)
    collator = SpeechCollator(fe, tok)
    train_ds = build_speech_dataset(SpeechSpec("train", a.train_n, TRAIN_VOICES, seed=a.seed), progress=a.progress)
    test_ds = build_speech_dataset(SpeechSpec("eval", a.test_n, TEST_VOICES, seed=a.seed + 1), progress=a.progress)
    print(f"data: {len(train_ds)} train / {len(test_ds)} test utterances ({time.time() - t_start:.0f} s)", flush=True)

    # a trained teacher is reused across runs with the same data/model/steps (it is the slowest stage)
    key = f"teacher-n{a.train_n}-h{a.hidden}-l{a.layers}-a{a.heads}-s{a.teacher_steps}-lr{a.lr}-b{a.batch}-seed{a.seed}"
    if (a.work / key / "config.json").exists():
        teacher = ParakeetForCTC.from_pretrained(a.work / key).to(a.device).eval()
        print(f"[teacher] reloaded from {a.work / key}", flush=True)
    else:
        teacher = ParakeetForCTC(make_teacher_config(a, tok)).to(a.device)
        teacher = train_ctc(teacher, a, train_ds, collator, a.teacher_steps, a.lr, "teacher")
        teacher.save_pretrained(a.work / key)

    student = copy.deepcopy(teacher).train()
    cfg = L0PruningConfig(target_sparsity=a.target, warmup_steps=int(0.6 * a.prune_steps), gate_lr=0.1,
                          lambda_lr=0.1, distill_weight=1.0)
    t0 = time.time()
    pt = PruningTrainer(model=student, teacher=teacher, pruning_config=cfg,
                        args=training_args(a, a.work / "prune", a.prune_steps, a.lr / 4), train_dataset=train_ds,
                        data_collator=collator)
    pt.train()
    prune_log = [h for h in pt.state.log_history if "expected_sparsity" in h]
    print(f"[prune] {a.prune_steps} steps in {time.time() - t0:.0f} s", flush=True)
    for h in prune_log:
        print("   ", {k: h[k] for k in ("step", "ctc_loss", "distill_loss", "expected_sparsity", "target_sparsity",
                                        "lambda1", "lambda2")}, flush=True)
    ours_unfinetuned = pt.pruned_model().eval()
    pt.pruner.remove()
    ours_pre = evaluate(ours_unfinetuned, test_ds, collator, a)
    ours = train_ctc(copy.deepcopy(ours_unfinetuned).train(), a, train_ds, collator, a.finetune_steps, a.lr / 4,
                     "ours_finetune")

    # the magnitude baseline at (at most) our parameter count
    target_params = count_params(ours)
    lo, hi = 0.01, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if count_params(prune_parakeet(teacher, magnitude_masks(teacher, mid))) <= target_params:
            lo = mid
        else:
            hi = mid
    magnitude = prune_parakeet(teacher, magnitude_masks(teacher, lo))
    magnitude = train_ctc(magnitude.train(), a, train_ds, collator, a.prune_steps + a.finetune_steps, a.lr / 4,
                          "magnitude_finetune")

    scratch_cfg = copy.deepcopy(magnitude.config)
    scratch = PrunedParakeetForCTC(scratch_cfg).to(a.device)
    scratch = train_ctc(scratch, a, train_ds, collator, a.teacher_steps, a.lr, "scratch")

    models = {"teacher": teacher, "ours_l0": ours, "magnitude_ft": magnitude, "scratch": scratch}
    lat = latency(models, a, fe)
    rows = []
    base = None
    for name, m in models.items():
        ev = evaluate(m, test_ds, collator, a)
        r = {"name": name, "params_M": count_params(m) / 1e6, "wer": ev["wer"], "cer": ev["cer"],
             "latency_ms": lat[name]["latency_b1_ms"], **lat[name]}
        base = base or r
        r["params_ratio"] = r["params_M"] / base["params_M"]
        r["wer_rel_change"] = r["wer"] / base["wer"] - 1 if base["wer"] > 0 else float("nan")
        r["latency_b1_reduction"] = 1 - r["latency_b1_ms"] / base["latency_b1_ms"]
        r["latency_b16_reduction"] = 1 - r["latency_b16_ms"] / base["latency_b16_ms"]
        r["example"] = ev["example"]
        rows.append(r)
    rows.insert(2, {"name": "ours_l0_before_finetune", "params_M": count_params(ours_unfinetuned) / 1e6,
                    "wer": ours_pre["wer"], "cer": ours_pre["cer"], "example": ours_pre["example"]})
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.update(reference=test_ds[0]["text"], layout_ours=layout_from_model(ours),
                    layout_magnitude=layout_from_model(magnitude), magnitude_keep_fraction=lo,
                    prune_log=prune_log, threads=a.threads if a.device == "cpu" else None,
                    wall_s=round(time.time() - t_start))
    print_rows(rows)
    cols = ["name", "params_M", "params_ratio", "wer", "cer", "wer_rel_change", "latency_b1_ms", "latency_b16_ms",
            "latency_b1_reduction", "latency_b16_reduction"]
    write_results(a.name, rows, settings, out_dir=a.out_dir, columns=cols)
    print(json.dumps({"wall_s": settings["wall_s"]}))


if __name__ == "__main__":
    main()
