import pytest
import torch

from hf_efficient import registry


def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", registry.Registry())
    monkeypatch.setattr(registry, "_applied", set())


def test_import_registers_foundation_entries():
    import hf_efficient  # noqa: F401

    reg = registry.register_all()
    assert {"eval", "bench", "demo"} <= set(reg.commands)
    assert "fp32" in reg.demo_rows
    assert registry.register_all() is reg  # idempotent


def test_quantization_method_reaches_transformers(monkeypatch):
    from transformers.quantizers import auto as qauto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    _fresh_registry(monkeypatch)

    class DummyConfig(QuantizationConfigMixin):
        def __init__(self, **kw):
            self.quant_method = "hfe_test_dummy"

    class DummyQuantizer(HfQuantizer):
        requires_calibration = False

    registry.add_quantization_method("hfe_test_dummy", DummyConfig, DummyQuantizer)
    try:
        registry.register_all()
        assert qauto.AUTO_QUANTIZATION_CONFIG_MAPPING["hfe_test_dummy"] is DummyConfig
        assert qauto.AUTO_QUANTIZER_MAPPING["hfe_test_dummy"] is DummyQuantizer
        registry.register_all()  # a second application must not raise "already registered"
    finally:
        qauto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("hfe_test_dummy", None)
        qauto.AUTO_QUANTIZER_MAPPING.pop("hfe_test_dummy", None)


def test_attention_function_reaches_transformers(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import sdpa_mask

    _fresh_registry(monkeypatch)

    def attn(module, q, k, v, mask, **kw):
        raise AssertionError("not called")

    registry.add_attention("hfe_test_attn", attn, sdpa_mask)
    registry.register_all()
    assert AttentionInterface._global_mapping["hfe_test_attn"] is attn


def test_conflicting_registration_is_refused(monkeypatch):
    _fresh_registry(monkeypatch)
    registry.add_demo_row("x", "first", lambda *a, **k: None)
    registry.add_demo_row("x", "first", registry.REGISTRY.demo_rows["x"].build)  # same entry again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.add_demo_row("x", "second", lambda *a, **k: None)


def test_name_taken_by_another_library_is_refused(monkeypatch):
    from transformers.quantizers import auto as qauto

    _fresh_registry(monkeypatch)
    registry.add_quantization_method("gptq", type("C", (), {}), type("Q", (), {}))
    with pytest.raises(ValueError, match="already registered in transformers"):
        registry.register_all()
    assert qauto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"].__name__ == "GPTQConfig"
