"""``hf-efficient energy-tune`` on the CPU: shape listing from a model config, clear errors, and the tuning
path with the GPU and counter replaced at the boundary (the search, table and plot code run for real)."""
from __future__ import annotations

import json

import pytest
import torch

from hf_efficient.cli import main


@pytest.fixture
def tiny_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path)
    return tmp_path


def test_list_shapes(tiny_model, capsys):
    assert main(["energy-tune", str(tiny_model), "--list"]) == 0
    out = capsys.readouterr().out
    # q/o 64x64, k/v 32x64 (2 KV heads of 16), gate/up 96x64, down 64x96, head 128x64
    for line in ("linear 64 x 64: 4", "linear 32 x 64: 4", "linear 96 x 64: 4", "linear 64 x 96: 2",
                 "linear 128 x 64: 1"):
        assert line in out


@pytest.mark.parametrize("argv,msg", [
    (["--batch", "1,x"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--eps", "2"], "eps"),
    (["--out", "/nonexistent/dir/t.json"], "does not exist"),
])
def test_bad_arguments(tiny_model, capsys, argv, msg):
    assert main(["energy-tune", str(tiny_model), *argv]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_no_gpu_is_a_one_line_error(tiny_model, capsys, tmp_path):
    assert main(["energy-tune", str(tiny_model), "--out", str(tmp_path / "t.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_tune_writes_table_and_plot(tiny_model, tmp_path, monkeypatch, capsys):
    """The GPU pieces (CUDA check, tensors on "cuda", NVML, measure_op) are swapped for CPU stand-ins; the
    candidates still run under the Triton interpreter and the search, table and plot are the real code."""
    import hf_efficient.energy.measure as measure
    import hf_efficient.energy.tune as tune
    from hf_efficient.energy.measure import OpEnergy
    from hf_efficient.energy.tables import validate

    class Counter:
        def name(self):
            return "Test GPU"

    def fake_measure(fn, counter=None, window_s=2.0, **kw):
        fn()
        return OpEnergy(1e-3, 1e-5, 100.0, 0.004, 1, 20, window_s)

    real_randn = torch.randn
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune.torch, "randn", lambda *a, device=None, dtype=None, **k: real_randn(*a, **k).half())
    monkeypatch.setattr(measure, "NVMLCounter", Counter)
    monkeypatch.setattr(measure, "measure_op", fake_measure)
    monkeypatch.setattr(tune, "linear_shapes", lambda cfg: [(48, 64, 3)])
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    assert main(["energy-tune", str(tiny_model), "--out", str(out), "--plot", str(png), "--no-progress"]) == 0
    table = validate(json.loads(out.read_text()))
    assert table["gpu"] == "Test GPU" and "1x48x64" in table["choices"]["bf16_gemv"]
    assert 3 <= len(table["rows"]) <= 7  # the guided search's budget: 20 % of 36 candidates
    assert png.stat().st_size > 0
