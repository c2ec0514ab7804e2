import ast
from pathlib import Path

import pytest

from hf_efficient import registry

PACKAGE = Path(registry.__file__).parent


def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", registry.Registry())
    monkeypatch.setattr(registry, "_applied", set())


def test_import_registers_foundation_entries():
    import hf_efficient  # noqa: F401

    from transformers.quantizers import auto as qauto

    from hf_efficient.integrations.transformers import HfEfficientQuantizer

    reg = registry.register_all()
    assert {"afpq", "mofq", "lut"} <= set(reg.quantization)
    assert "seer_attention" in reg.attention
    for name, m in reg.quantization.items():
        # the registry pairs every config of ours with the one generic quantizer
        assert qauto.AUTO_QUANTIZER_MAPPING[name] is HfEfficientQuantizer
        assert qauto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] is m.config_cls
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
    def first(*a, **k):
        return None

    registry.add_attention("x", first)
    registry.add_attention("x", first)  # same entry again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.add_attention("x", lambda *a, **k: None)


def test_name_taken_by_another_library_is_refused(monkeypatch):
    from transformers.quantizers import auto as qauto

    _fresh_registry(monkeypatch)
    registry.add_quantization_method("gptq", type("C", (), {}), type("Q", (), {}))
    with pytest.raises(ValueError, match="already registered in transformers"):
        registry.register_all()
    assert qauto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq"].__name__ == "GPTQConfig"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the hf_efficient modules ``path`` imports (relative imports resolved)."""
    pkg = ".".join(("hf_efficient",) + path.relative_to(PACKAGE).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg += ".__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:-node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("hf_efficient")}


CAPABILITIES = [p for p in sorted(PACKAGE.iterdir())
                if p.is_dir() and (p / "__init__.py").exists() and p.name not in ("cli", "integrations")]


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda p: p.name)
def test_capabilities_never_import_cli_or_integrations(capability):
    # kernels <- capabilities <- integrations <- cli: a capability is a library.
    bad = {}
    for f in capability.rglob("*.py"):
        hits = sorted(m for m in _imported_modules(f)
                      if m.startswith(("hf_efficient.cli", "hf_efficient.integrations", "hf_efficient.commands")))
        if hits:
            bad[str(f.relative_to(PACKAGE))] = hits
    assert not bad, f"capability modules import the CLI or the integrations layer: {bad}"


def test_integrations_never_import_cli():
    bad = {str(f.relative_to(PACKAGE)): sorted(m for m in _imported_modules(f) if m.startswith("hf_efficient.cli"))
           for f in (PACKAGE / "integrations").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
