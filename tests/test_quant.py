"""AFPQ / MoFQ inside transformers: quantize on load, packed save, reload (in-process and in a fresh
process), modules_to_not_convert, configs and every bad-input case of the issue. Tiny random Llamas."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hf_efficient  # noqa: F401  (registers afpq/mofq)
from hf_efficient import AFPQConfig, MoFQConfig, load_quant_config
from hf_efficient.integrations.transformers import QuantizationLoadError
from hf_efficient.quantization import QuantLinear
from tests.quant_checkpoints import load, rewrite

VOCAB = 256


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny Llama whose widths (64, 96) are not multiples of the group sizes used below."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).eval()
    d = tmp_path_factory.mktemp("float")
    model.save_pretrained(d)
    return d


_load = load


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))

# (id, config factory, expected format of every converted layer or None for a per-layer choice, max rel. error)
CASES = [
    ("afpq-fp4-g32", lambda: AFPQConfig(bits=4, group_size=32, fmt="fp"), "fp4_asym", 0.15),
    ("afpq-nf3-g40", lambda: AFPQConfig(bits=3, group_size=40, fmt="nf"), "nf3_asym", 0.3),
    ("fp3-sym-g64", lambda: AFPQConfig(bits=3, group_size=64, fmt="fp", asymmetric=False), "fp3_sym", 0.4),
    ("int4-asym-perchannel", lambda: AFPQConfig(bits=4, group_size=-1, fmt="int"), "int4_asym", 0.2),
    ("int2-asym-g16-bf16", lambda: AFPQConfig(bits=2, group_size=16, fmt="int", scale_dtype="bfloat16"),
     "int2_asym", 1.5),
    ("int8-sym", lambda: AFPQConfig(bits=8, group_size=128, fmt="int", asymmetric=False), "int8_sym", 0.01),
    ("fp8-sym", lambda: AFPQConfig(bits=8, group_size=-1, fmt="fp", asymmetric=False), "fp8_sym", 0.05),
    ("mofq-w4", lambda: MoFQConfig(bits=4, group_size=32, candidates="sym"), None, 0.2),
    ("mofq-w8", lambda: MoFQConfig(bits=8, group_size=-1), None, 0.05),
]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_quantize_on_load_save_reload(case, float_dir, tmp_path):
    _, make, fmt, tol = case
    ref = _load(float_dir)
    model = _load(float_dir, quantization_config=make())
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 14 and isinstance(model.lm_head, nn.Linear)  # lm_head skipped by default
    cfg = model.config.quantization_config
    for n, m in qls.items():
        assert m.fmt.name == (fmt or cfg.layer_formats[n])
        assert not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        logits = model(IDS).logits
        assert _rel(logits, ref(IDS).logits) < tol
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    # packed under names nn.Linear lacks; its `weight` holds only format_version 2's 1-element load guard
    assert all(saved[k].shape == (1,) for k in saved if k.endswith("proj.weight"))
    assert saved["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    saved_cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved_cfg["format_version"] == 2 and saved_cfg["quant_method"] == make().quant_method
    if fmt is None:
        assert set(saved_cfg["layer_formats"]) == set(qls)
    again = _load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, logits)
    for n, m in again.named_modules():
        if isinstance(m, QuantLinear):
            assert m.fmt == qls[n].fmt and m.qweight.dtype == torch.int32
            for p in m.fmt.param_names:
                assert getattr(m, p).dtype == (torch.uint8 if p == "zeros" else qls[n].scale_dtype)


def test_reload_in_fresh_process(float_dir, tmp_path):
    """A new interpreter that imports hf_efficient reloads AFPQ, MoFQ and GPTQ-written checkpoints bit-exactly."""
    from hf_efficient.quantization.api import quantize_model

    dirs = []
    for i, make in enumerate([lambda: AFPQConfig(bits=4, group_size=40, fmt="nf"), lambda: MoFQConfig(bits=4, candidates="sym")]):
        m = _load(float_dir, quantization_config=make())
        d = tmp_path / f"m{i}"
        m.save_pretrained(d)
        with torch.no_grad():
            torch.save(m(IDS).logits, d / "expected.pt")
        dirs.append(d)
    m = _load(float_dir)
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    quantize_model(m, AFPQConfig(bits=3, group_size=32, fmt="fp", algorithm="gptq", act_order=True), windows,
                   progress=False)
    d = tmp_path / "gptq"
    m.save_pretrained(d)
    with torch.no_grad():
        torch.save(m(IDS).logits, d / "expected.pt")
    dirs.append(d)
    torch.save(IDS, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        import hf_efficient
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        for d in sys.argv[1:]:
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                assert torch.equal(m(ids).logits, torch.load(d + "/expected.pt")), d
        print("IDENTICAL", len(sys.argv) - 1)
    """)
    out = subprocess.run([sys.executable, "-c", code, *map(str, dirs)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IDENTICAL 3" in out.stdout


def test_load_without_plugin_is_loud(float_dir, tmp_path):
    _load(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32)).save_pretrained(tmp_path)
    code = ("from transformers import AutoModelForCausalLM as A; import sys; "
            "m = A.from_pretrained(sys.argv[1]); print(type(m.model.layers[0].mlp.up_proj).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    # format_version 2's guards: each layer's 1-element `weight` cannot land in nn.Linear, so transformers
    # raises (it would otherwise initialise every linear at random); its report names the package.
    assert out.returncode != 0 and "Linear" not in out.stdout
    assert "ignore_mismatched_sizes" in text and "MISMATCH" in text and "import_hf_efficient" in text


def test_modules_to_not_convert(float_dir):
    m = _load(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32, modules_to_not_convert=["mlp",
                                                                                                     "lm_head"]))
    assert isinstance(m.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)
    m = _load(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32,
                                                        modules_to_not_convert=[r"model\.layers\.1\..*", "lm_head"]))
    assert isinstance(m.model.layers[1].self_attn.q_proj, nn.Linear)
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fmt="fp", bits=2), "no asymmetric FP format with bits=2"),
    (dict(fmt="nf", bits=8), "no asymmetric NF format with bits=8"),
    (dict(fmt="fp", bits=8), "no asymmetric FP format"),
    (dict(fmt="int", bits=5), "no asymmetric INT format with bits=5"),
    (dict(fmt="mx"), "fmt='mx'"),
    (dict(group_size=0), "group_size=0"),
    (dict(group_size=-2), "group_size=-2"),
    (dict(scale_dtype="float64"), "scale_dtype"),
    (dict(algorithm="awq"), "algorithm"),
    (dict(format_version=3), "format_version=3"),
    (dict(bogus=1), "unknown fields \\['bogus'\\]"),
])
def test_afpq_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AFPQConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits"),
    (dict(bits=4, candidates=["int8_sym"]), "bits=4"),
    (dict(bits=4, candidates=["fp4_nope"]), "known formats"),
    (dict(bits=8, act_bits=4), "act_bits"),
    (dict(bits=4, candidates=["nf4_sym"], act_bits=8), "int or fp"),
    (dict(selection="magic"), "selection"),
    (dict(layer_formats={"x": "int2_asym"}), "layer_formats"),
])
def test_mofq_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoFQConfig(**kwargs)


@pytest.mark.parametrize("cfg", [AFPQConfig(algorithm="gptq"), MoFQConfig(bits=8, act_bits=8),
                                 MoFQConfig(candidates=["int4_asym", "fp4_asym"])], ids=["gptq", "w8a8", "layouts"])
def test_on_load_refuses_what_needs_calibration(cfg, float_dir):
    with pytest.raises(ValueError, match="cannot quantize on load.*hf-efficient quantize"):
        _load(float_dir, quantization_config=cfg)


def test_nan_weights_error_names_layer(float_dir, tmp_path, caplog):
    sd = load_file(float_dir / "model.safetensors")
    sd["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((float_dir / "config.json").read_text())
    # transformers collects conversion errors into its load report and then raises a generic error;
    # our message (layer name, NaN/Inf) is in that report.
    with pytest.raises(Exception, match="conversion|non-finite"):
        _load(tmp_path, quantization_config=AFPQConfig(bits=4, group_size=32))
    assert "cannot quantize layer model.layers.1.mlp.gate_proj: its weight has 1 non-finite values (NaN)" \
        in caplog.text


@pytest.fixture(scope="module")
def saved_afpq(float_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("afpq")
    _load(float_dir, quantization_config=AFPQConfig(bits=4, group_size=32)).save_pretrained(d)
    return d


def _variant(saved, tmp_path, edit_tensors=None, edit_config=None):
    return rewrite(saved, tmp_path, edit_tensors, edit_config)


def test_unknown_format_version(saved_afpq, tmp_path):
    d = _variant(saved_afpq, tmp_path, edit_config=lambda c: c.update(format_version=7))
    with pytest.raises(ValueError, match=r"format_version=7.*reads checkpoint format_version \(1, 2\)"):
        _load(d)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("model.layers.0.mlp.up_proj.scales_neg"), "up_proj.scales_neg: missing"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.scales_neg", torch.zeros(96, 3, dtype=torch.float16)),
     "shape \\[96, 3\\] in the checkpoint, \\[96, 2\\] expected"),
    (lambda sd: sd.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(32, 64)),
     "k_proj.weight: unexpected"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.qweight",
                               torch.zeros(64, 16, dtype=torch.int32)), "q_proj.qweight: shape"),
], ids=["missing", "scale-shape", "float-weight", "qweight-shape"])
def test_mismatched_tensors(saved_afpq, tmp_path, edit, match):
    d = _variant(saved_afpq, tmp_path, edit_tensors=edit)
    with pytest.raises(QuantizationLoadError, match=match):
        _load(d)


def test_config_says_other_format_than_tensors(saved_afpq, tmp_path):
    # fp4 two-scale tensors, config claiming symmetric NF4: refused before anything loads
    d = _variant(saved_afpq, tmp_path, edit_config=lambda c: c.update(fmt="nf", asymmetric=False))
    with pytest.raises(QuantizationLoadError, match="scales_pos: unexpected"):
        _load(d)


@pytest.mark.parametrize("name", ["afpq-fp4-g128", "afpq-nf3-g64", "mofq-w4", "mofq-w8a8"])
def test_hub_configs(name, float_dir):
    cfg = load_quant_config(name)
    assert cfg.to_dict()["quant_method"] in ("afpq", "mofq")
    if cfg.needs_calibration():
        assert name == "mofq-w8a8"  # needs calibration: hf_efficient.quantize / the CLI
        return
    m = _load(float_dir, quantization_config=cfg)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)


def test_unknown_hub_config():
    with pytest.raises(ValueError, match="neither a file nor a recipe"):
        load_quant_config("afpq-fp7")


@pytest.mark.slow
def test_embedded_model_short_last_group(embedded_path, embedded_tokenizer):
    """576 and 1536 are not multiples of 128: the last group of q_proj rows holds 64 columns."""
    ref = _load(embedded_path)
    m = _load(embedded_path, quantization_config=AFPQConfig(bits=4, group_size=128, fmt="fp"))
    q = m.model.layers[0].self_attn.q_proj
    assert q.scales_pos.shape == (576, 5) and m.model.layers[0].mlp.down_proj.scales_pos.shape == (576, 12)
    ids = embedded_tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
                             "suffer the slings and arrows of outrageous fortune", return_tensors="pt").input_ids
    with torch.no_grad():
        lq, lf = m(ids, labels=ids).loss.item(), ref(ids, labels=ids).loss.item()
    assert abs(lq - lf) < 0.15 * lf, (lq, lf)
