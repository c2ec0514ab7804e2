"""Helpers shared by the checkpoint tests: a tiny float Llama on disk, loading, rewriting a saved checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_tiny_float(d: Path, vocab_size: int = 256) -> Path:
    """A tiny random Llama (hidden 64, MLP 96; seed 0) saved at ``d``."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=vocab_size)).eval().save_pretrained(d)
    return d


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def rewrite(saved: Path, out: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy checkpoint ``saved`` to ``out`` (created) after ``edit_tensors(state_dict)`` /
    ``edit_config(quantization_config dict)``."""
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(saved / "model.safetensors")
    cfg = json.loads((saved / "config.json").read_text())
    if edit_tensors:
        edit_tensors(sd)
    if edit_config:
        edit_config(cfg["quantization_config"])
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out
