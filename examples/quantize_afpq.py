"""AFPQ in three steps on the embedded SmolLM2-135M: quantize on load, save packed, reload; then GPTQ via the API.

Run from the repo root: ``python examples/quantize_afpq.py`` (CPU, about a minute; GPTQ part with --gptq).
"""
from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_efficient  # registers quant_method "afpq" / "mofq" with transformers: import it first
from hf_efficient import AFPQConfig, load_quant_config
from hf_efficient.data import token_ids
from hf_efficient.evaluation import perplexity, state_dict_bytes
from hf_efficient.models import default_model_path, load_model

path = default_model_path()
fp32, tok = load_model(path)
ids = token_ids(tok, "eval", 2048)
print(f"fp32               PPL {perplexity(fp32, ids, progress=False):7.2f}  {state_dict_bytes(fp32) / 2**20:6.1f} MiB")

# 1. quantize on load (round-to-nearest), AFPQ FP4 with separate scales for positive/negative halves
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=AFPQConfig(bits=4, group_size=128, fmt="fp"))
print(f"AFPQ FP4 g128 RTN  PPL {perplexity(model, ids, progress=False):7.2f}  "
      f"{state_dict_bytes(model) / 2**20:6.1f} MiB")

# 2. packed safetensors + format_version; reload with plain from_pretrained (after `import hf_efficient`)
with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    x = ids[None, :64]
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    print("reloaded: identical logits")

# 3. a recipe from hub_configs/ in one line
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=load_quant_config("afpq-nf3-g64"))
print(f"AFPQ NF3 g64 RTN   PPL {perplexity(model, ids, progress=False):7.2f}")

if "--gptq" in sys.argv:
    # 4. calibrated (GPTQ-style) quantization on the training plays, written as a pre-quantized checkpoint
    with tempfile.TemporaryDirectory() as out:
        cfg = AFPQConfig(bits=3, group_size=128, fmt="nf", algorithm="gptq", calib_samples=8, calib_seqlen=512)
        hf_efficient.quantize(None, cfg, out)
        model = AutoModelForCausalLM.from_pretrained(out)
        print(f"AFPQ NF3 g128 GPTQ PPL {perplexity(model, ids, progress=False):7.2f}")
