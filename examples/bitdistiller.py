"""BitDistiller in a few lines: teacher-generated text, QAT with CAKLD in Trainer, export, reload.

Runs on the CPU in a few minutes with the tiny settings below (a demonstration, not a recipe: see
docs/bitdistiller.md for the settings that recover a 2-bit model on a GPU).

    python examples/bitdistiller.py
"""
import tempfile

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_efficient  # noqa: F401  (registers our quantization methods: needed to reload the export)
from hf_efficient.data import token_ids
from hf_efficient.distill import BitDistillerCallback, BitDistillerConfig, convert, generate_training_data
from hf_efficient.evaluation import perplexity
from hf_efficient.models import load_default

torch.manual_seed(0)
model, tok = load_default()
# 1. The float model writes its own training text (continuations of prompts from the training plays).
data = generate_training_data(model, tok, n_samples=8, prompt_len=16, gen_len=48, batch_size=8)
data = data.remove_columns(["text", "prompt_len"]).map(lambda r: {"labels": r["input_ids"]})

# 2. One callback turns a Trainer recipe into BitDistiller: float teacher copy, clipping init on the first
#    training sequences, fake quantization (INT3-asym, g128), CAKLD loss with beta from the teacher.
cfg = BitDistillerConfig(bits=3, group_size=128, fmt="int", clip_grid=4, clip_samples=4)
out = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, learning_rate=5e-5,
                         report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
Trainer(model=model, args=args, train_dataset=data, callbacks=[BitDistillerCallback(cfg)]).train()

# 3. Export to a packed AFPQ/INT checkpoint; it reloads with from_pretrained after `import hf_efficient`.
eval_ids = token_ids(tok, "eval", max_tokens=1024)
print("fake-quant model PPL", perplexity(model, eval_ids, context=512))
convert(model, cfg).save_pretrained(out + "/w3")
reloaded = AutoModelForCausalLM.from_pretrained(out + "/w3")
print("exported model PPL  ", perplexity(reloaded, eval_ids, context=512))
