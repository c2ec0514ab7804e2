"""Prune a (tiny, untrained) Conformer-CTC with L0 gates + layerwise distillation, then remove the pruned parts.

Runs in about a minute on a CPU:  python examples/prune_conformer.py
For a real run, start from a trained ParakeetForCTC and more data/steps (see benchmarks/pruning_conformer.py).
"""
import tempfile

import torch
from transformers import ParakeetCTCConfig, ParakeetFeatureExtractor, ParakeetForCTC, TrainingArguments

from hf_efficient.pruning import (L0PruningConfig, PrunedParakeetForCTC, PruningTrainer, count_params,
                                  layout_from_model)
from hf_efficient.pruning.speech import (TRAIN_VOICES, CharTokenizer, SpeechCollator, SpeechSpec,
                                         build_speech_dataset, transcribe)

tok = CharTokenizer()
collator = SpeechCollator(ParakeetFeatureExtractor(feature_size=80), tok)
data = build_speech_dataset(SpeechSpec("train", 32, TRAIN_VOICES))  # Shakespeare lines spoken by espeak-ng

encoder = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               subsampling_conv_channels=16, num_mel_bins=80, subsampling_factor=4, layerdrop=0.0)
model = ParakeetForCTC(ParakeetCTCConfig(vocab_size=tok.vocab_size, pad_token_id=tok.blank_id,
                                         encoder_config=encoder))

out = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                         logging_steps=10, report_to=[], remove_unused_columns=False, save_strategy="no",
                         use_cpu=True)
trainer = PruningTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                         pruning_config=L0PruningConfig(target_sparsity=0.5, warmup_steps=10, gate_lr=0.5,
                                                        lambda_lr=0.5))
trainer.train()  # logs show expected_sparsity climbing towards target_sparsity, and lambda1/lambda2

pruned = trainer.pruned_model()  # a smaller dense model: pruned heads/neurons/channels/modules are gone
print(f"params {count_params(model):,} -> {count_params(pruned):,}; per-block layout {layout_from_model(pruned)}")

pruned.save_pretrained(out + "/pruned")
reloaded = PrunedParakeetForCTC.from_pretrained(out + "/pruned")
print("transcripts (untrained model, expect noise):", transcribe(reloaded, data.select(range(2)), collator))
