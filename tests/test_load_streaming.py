"""Quantize-on-load streams: transformers' threaded loader is off while our conversion runs, and the user's
setting of its switch comes back afterwards (the GPU load peak of quantize-on-load is measured by
benchmarks/quant_load_memory.py)."""
from __future__ import annotations

import os

import pytest
import torch

from hf_efficient import AFPQConfig
from hf_efficient.integrations import transformers as integ
from tests.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("float_llama")
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).save_pretrained(d)
    return d


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_quantize_on_load_runs_sequentially_and_restores_the_switch(float_dir, monkeypatch, user_setting):
    from transformers import AutoModelForCausalLM

    if user_setting is None:
        monkeypatch.delenv(integ.ASYNC_LOAD_ENV, raising=False)
    else:
        monkeypatch.setenv(integ.ASYNC_LOAD_ENV, user_setting)
    seen = []
    convert = integ.QuantizeOnLoad.convert

    def spy(self, *args, **kwargs):
        seen.append(os.environ.get(integ.ASYNC_LOAD_ENV))
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(integ.QuantizeOnLoad, "convert", spy)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32))
    assert len(seen) == 14 and set(seen) == {"1"}  # 7 linears x 2 layers, each converted with the pool off
    assert os.environ.get(integ.ASYNC_LOAD_ENV) == user_setting
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_a_prequantized_reload_leaves_the_switch_alone(float_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(integ.ASYNC_LOAD_ENV, raising=False)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32)) \
        .save_pretrained(tmp_path)
    seen = []
    orig = integ.HfEfficientQuantizer._process_model_after_weight_loading

    def spy(self, model, **kwargs):
        seen.append(os.environ.get(integ.ASYNC_LOAD_ENV))
        return orig(self, model, **kwargs)

    monkeypatch.setattr(integ.HfEfficientQuantizer, "_process_model_after_weight_loading", spy)
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert seen == [None]
