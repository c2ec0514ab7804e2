"""Damaged and foreign loads fail loudly: no import (load guards), truncated files, NaN scales; the model card."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hf_efficient
from hf_efficient.checkpoint import CheckpointError, check_safetensors_file
from hf_efficient.quantization.card import MARKER
from hf_efficient.quantization.packing import FORMAT_VERSION, GUARD_KEY, GUARD_TENSOR
from tests.quant_checkpoints import load, rewrite, save_tiny_float

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 77]])


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny_float(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module")
def saved(float_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("afpq")
    m = load(float_dir, quantization_config=hf_efficient.AFPQConfig(bits=4, group_size=32))
    m.save_pretrained(d)
    with torch.no_grad():
        torch.save(m(IDS).logits, d / "expected.pt")
    return d


def test_saved_checkpoint_carries_guards(saved):
    sd = load_file(saved / "model.safetensors")
    layers = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".qweight")}
    assert len(layers) == 14
    for layer in layers:
        assert sd[f"{layer}.{GUARD_TENSOR}"].tolist() == [FORMAT_VERSION]
    assert GUARD_KEY in sd
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["format_version"] == 2


def test_load_without_import_fails_in_a_fresh_process(saved):
    # No `import hf_efficient` in this interpreter: transformers alone must refuse, not initialise at random.
    code = ("import sys; from transformers import AutoModelForCausalLM as A\n"
            "m = A.from_pretrained(sys.argv[1])\n"
            "print('LOADED', type(m.model.layers[0].mlp.up_proj).__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "RuntimeError" in r.stderr and "mismatch" in r.stderr.lower()
    assert GUARD_KEY in r.stderr  # the load report names what to import


def test_load_with_import_is_exact_and_quiet(saved, caplog):
    m = load(saved)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, torch.load(saved / "expected.pt"))
    assert "UNEXPECTED" not in caplog.text and GUARD_KEY not in caplog.text


def test_format_version_1_still_loads(saved, tmp_path):
    # Version 1 had no guards; such checkpoints exist and must keep loading bit-exactly.
    def strip(sd):
        for k in [k for k in sd if k == GUARD_KEY or (k.endswith("." + GUARD_TENSOR) and sd[k].shape == (1,))]:
            del sd[k]

    d = rewrite(saved, tmp_path, strip, lambda c: c.update(format_version=1))
    m = load(d)
    assert m.config.quantization_config.format_version == 1
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, torch.load(saved / "expected.pt"))
    m.save_pretrained(tmp_path / "resaved")  # re-saving upgrades it
    again = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert again["format_version"] == FORMAT_VERSION and GUARD_KEY in load_file(tmp_path / "resaved" /
                                                                                  "model.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, -1000, -1])
def test_truncated_file_is_named(saved, tmp_path, keep):
    data = (saved / "model.safetensors").read_bytes()
    f = tmp_path / "model.safetensors"
    f.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is (truncated|corrupt)"):
        check_safetensors_file(f)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)  # through transformers, with the import: our check runs before any tensor is read


def test_corrupt_header_is_named(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes((5).to_bytes(8, "little") + b"\xff{bad")
    with pytest.raises(CheckpointError, match="x.safetensors is corrupt"):
        check_safetensors_file(f)


def test_truncated_file_through_the_cli_is_one_line(saved, tmp_path, capsys):
    from hf_efficient.cli import main

    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    assert main(["eval", "--model", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is truncated" in err


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.up_proj.scales_pos", float("nan")),
                                          ("model.layers.0.self_attn.k_proj.scales_neg", float("inf"))])
def test_non_finite_scale_is_refused_naming_the_tensor(saved, tmp_path, tensor, value):
    def poison(sd):
        sd[tensor][3, 1] = value

    d = rewrite(saved, tmp_path, poison)
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.") + " holds 1 non-finite"):
        load(d)


def test_model_card(saved, tmp_path):
    card = (saved / "README.md").read_text()
    for text in (MARKER, "| quant_method | afpq |", "| group size | 32 |", "fp4_asym", "pip install hf-efficient",
                 "import hf_efficient", "| format_version | 2 |", "perplexity | not measured"):
        assert text in card, text
    # a README that is not ours is never overwritten; ours carries measured metrics when known
    m = load(saved)
    (tmp_path / "README.md").write_text("my notes")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    m.hf_efficient_metrics = {"perplexity": 12.3456, "perplexity_on": "4096 held-out tokens"}
    m.save_pretrained(tmp_path / "b")
    assert "| perplexity | 12.346 (4096 held-out tokens) |" in (tmp_path / "b" / "README.md").read_text()


def test_model_card_lists_mofq_choices(float_dir, tmp_path):
    m = load(float_dir, quantization_config=hf_efficient.load_quant_config("mofq-w4"))
    m.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    n = sum(card.count(f"{f} (") for f in ("int4_sym", "fp4_sym"))
    assert n >= 1 and "layers)" in card and "| quant_method | mofq |" in card
