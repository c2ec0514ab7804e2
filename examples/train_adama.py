"""AdamA in two forms: a plain PyTorch accumulation loop, and the one-line switch of a Trainer recipe.

Run: ``python examples/train_adama.py [--model DIR] [--steps 3]`` (CPU is fine: a few minutes on the
embedded SmolLM2-135M; pass --tiny for a random 2-layer Llama that runs in seconds).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import hf_efficient  # noqa: F401  registers the suite
from hf_efficient.optim import AdamA, AdamACallback, adama_optimizers


def load(args):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_efficient.models import load_model, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    if args.tiny:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg), tok
    return load_model(args.model)[0], tok


def plain_loop(model, windows, n, steps, state_bits):
    # state_bits: 32 (fp32 m, v), 16 (bf16) or 8 (block-wise 8-bit); low-bit states round stochastically
    opt = AdamA(model.parameters(), lr=3e-5, weight_decay=0.01, accumulation_steps=n, state_bits=state_bits)
    for step in range(steps):
        total = 0.0
        for i in range(n):
            ids = windows[(step * n + i) % len(windows)][None]
            loss = model(input_ids=ids, labels=ids).loss / n
            loss.backward()  # each parameter's gradient is folded into m, v and freed inside backward
            total += float(loss.detach())
        opt.step()
        print(f"plain loop step {step + 1}: loss {total:.4f}")


def trainer_recipe(model, windows, n, steps, state_bits):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": w, "labels": w} for w in windows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=n,
                                 max_steps=steps, learning_rate=3e-5, logging_steps=1, report_to=[], save_strategy="no",
                                 max_grad_norm=0.0,  # global-norm clipping cannot work once gradients are freed
                                 use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizers=adama_optimizers(model, args, state_bits=state_bits),  # the one-line switch
                          callbacks=[AdamACallback()])  # optional: logs AdamA's grad norm instead of Trainer's 0
        trainer.train()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--state-bits", type=int, default=32, choices=(32, 16, 8))
    args = ap.parse_args()
    from hf_efficient.data import sample_windows, token_ids

    model, tok = load(args)
    windows = sample_windows(token_ids(tok, "train", 50_000), args.steps * args.accumulation, args.seq_len)
    plain_loop(model.train(), windows, args.accumulation, args.steps, args.state_bits)
    trainer_recipe(model, list(windows), args.accumulation, args.steps, args.state_bits)


if __name__ == "__main__":
    main()
