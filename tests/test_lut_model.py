"""LUTConfig end to end on a tiny random Llama: quantize on load, LUT fast path, save/reload, generate()."""
from __future__ import annotations

import pytest
import torch

import hf_efficient  # noqa: F401  (registers quant_method "lut")
from hf_efficient.quantization import QuantLinear, reference_only
from hf_efficient.quantization.lut import MAX_LUT_ROWS, LUTConfig, enable_lut
from hf_efficient.quantization.lut import layer as lut_layer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config  # tests/ is on sys.path (rootdir conftest, no package)

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_lut")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    return d


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=2, group_size=64),
                                dict(bits=4, group_size=32, fmt="nf"), dict(bits=3, group_size=32, fmt="fp")])
def test_quantize_on_load_runs_lut_and_matches_reference(tiny_dir, kw):
    model = _load(tiny_dir, quantization_config=LUTConfig(**kw))
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert qlayers and all(getattr(m, "_lut_enabled", False) and hasattr(m, "_lut") for m in qlayers)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    orig = lut_layer.kernel.LUTWeight.matmul
    with torch.no_grad():
        lut_layer.kernel.LUTWeight.matmul = lambda self, x, **k: calls.append(1) or orig(self, x, **k)
        try:
            a = model(ids).logits
        finally:
            lut_layer.kernel.LUTWeight.matmul = orig
        with reference_only():
            b = model(ids).logits
    assert len(calls) == len(qlayers)
    assert float((a - b).norm() / b.norm()) < 0.02


def test_save_reload_generate(tiny_dir, tmp_path):
    model = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 12)
    model.save_pretrained(tmp_path)
    again = _load(tmp_path)
    assert isinstance(again.config.quantization_config, LUTConfig)
    layer = again.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer._lut_enabled
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
    assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), out)


def test_fast_path_declines_and_follows_weight_changes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear.from_linear(lin, "int4_asym", group_size=32)
    x = torch.randn(3, 64)
    ref = q.reference_forward(x)
    assert torch.equal(q(x), ref)  # not opted in: reference path
    enable_lut(q)
    y = q(x)
    assert not torch.equal(y, ref) and float((y - ref).norm() / ref.norm()) < 0.02  # LUT path, bias included
    big = torch.randn(MAX_LUT_ROWS + 1, 64)
    assert torch.equal(q(big), q.reference_forward(big))  # prefill-sized: BLAS on dequantized weights
    q.load_quantized(q.codes() ^ 1, q.params())  # in-place change of the stored codes
    ref2 = q.reference_forward(x)
    assert float((q(x) - ref2).norm() / ref2.norm()) < 0.02  # the kernel layout was rebuilt
    enable_lut(q, enabled=False)
    assert torch.equal(q(x), ref2)


def test_unsupported_group_size_keeps_reference_path():
    q = QuantLinear.from_linear(torch.nn.Linear(72, 8), "int4_asym", group_size=24)
    assert enable_lut(q) == []
    x = torch.randn(2, 72)
    assert torch.equal(q(x), q.reference_forward(x))


def test_afpq_layer_opts_in():
    q = QuantLinear.from_linear(torch.nn.Linear(128, 48, bias=False), "fp4_asym", group_size=64)
    assert enable_lut(q) == [""]
    x = torch.randn(2, 128)
    ref = q.reference_forward(x)
    assert float((q(x) - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("kw,match", [
    (dict(bits=5), "bits=5"), (dict(fmt="mx"), "fmt='mx'"), (dict(bits=2, fmt="fp"), "fmt='fp', bits=2"),
    (dict(asymmetric="yes"), "asymmetric"), (dict(group_size=0), "group_size")])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LUTConfig(**kw)


def test_config_round_trip():
    cfg = LUTConfig(bits=2, group_size=64, fmt="int")
    d = cfg.to_dict()
    assert d["quant_method"] == "lut" and LUTConfig.from_dict(d).to_dict() == d
