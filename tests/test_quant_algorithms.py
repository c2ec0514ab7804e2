"""GPTQ-style quantization (every scheme), MoFQ selection, W8A8 layers, the quantize CLI, and peft LoRA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_efficient  # noqa: F401
from hf_efficient import AFPQConfig, MoFQConfig, formats
from hf_efficient.quantization import QuantLinear
from hf_efficient.quantization.gptq import HessianAccumulator, gptq_quantize
from hf_efficient.quantization.linear import rtn_quantize
from hf_efficient.quantization.mofq import select
from hf_efficient.quantization.packing import expand_groups


def _layer_problem(k=160, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(1024, k, generator=g) @ mix + 0.05 * torch.randn(1024, k, generator=g)  # correlated inputs
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w


def _deq(fmt, codes, params, k, group):
    return formats.decode(fmt, codes, {p: expand_groups(t, k, group) for p, t in params.items()})


@pytest.mark.parametrize("name", ["int4_asym", "int3_asym", "fp4_sym", "nf4_sym", "fp4_asym", "nf4_asym",
                                  "fp3_asym", "nf3_asym", "int8_sym", "fp8_sym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(name, act_order):
    x, w = _layer_problem()
    fmt = formats.get_format(name)
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(300):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5)
    group = 64  # 160 = 64 + 64 + 32: a short last group
    codes, params = gptq_quantize(w, acc.H, fmt, group, act_order=act_order)
    rcodes, rparams = rtn_quantize(w, fmt, group, torch.float16)
    err = lambda c, p: ((x @ (_deq(fmt, c, p, 160, group) - w).T) ** 2).mean()  # noqa: E731
    assert err(codes, params) < 0.8 * err(rcodes, rparams)
    # the returned codes/params are a valid layer: QuantLinear reproduces the same weight
    q = QuantLinear(160, 48, fmt, group)
    q.load_quantized(codes, params)
    assert torch.equal(q.dequantize(), _deq(fmt, codes, params.copy() | {p: q.params()[p] for p in params}, 160,
                                            group))


def test_gptq_dead_inputs_and_bad_hessian():
    x, w = _layer_problem(k=64)
    x[:, 5] = 0.0
    H = 2 * x.T @ x / len(x)
    codes, params = gptq_quantize(w, H, formats.get_format("fp4_asym"), 32)
    assert torch.isfinite(_deq(formats.get_format("fp4_asym"), codes, params, 64, 32)).all()
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, H[:10, :10], formats.get_format("int4_sym"), 32, name="blk.0.q")
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="blk.0.q.*Inf"):
        gptq_quantize(bad, H, formats.get_format("int4_sym"), 32, name="blk.0.q")


def test_mofq_weight_mse_picks_the_better_format():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(64, 128, generator=g) * 2 - 1  # flat: INT's even grid fits
    heavy = torch.distributions.StudentT(2.0).sample((64, 128))  # heavy tails: FP's log grid fits
    cands = ["int4_sym", "fp4_sym"]
    assert select.best(select.weight_errors(uniform, cands, 128, torch.float16)) == "int4_sym"
    assert select.best(select.weight_errors(heavy, cands, 128, torch.float16)) == "fp4_sym"
    cfg = MoFQConfig(bits=4, group_size=128, candidates="sym")
    assert cfg.selection == "weight_mse" and not cfg.needs_calibration()
    for name, w in (("a", uniform), ("b", heavy)):
        cfg.record_choice(name, cfg.choose_format(name, w))
    assert cfg.layer_formats == {"a": "int4_sym", "b": "fp4_sym"}
    assert "FP 1 vs INT 1" in cfg.summary()


def test_mofq_output_error_uses_activations():
    x, w = _layer_problem(k=64)
    x[:, :4] *= 50  # activation outliers: per-token INT8 loses the small channels, FP8 keeps them
    cfg = MoFQConfig(bits=8, group_size=-1, act_bits=8)
    errs = select.output_errors(w, x, cfg.candidates, None, torch.float16, cfg.act_format)
    assert set(errs) == {"int8_sym", "fp8_sym"} and all(e > 0 for e in errs.values())
    assert cfg.choose_format("l", w, x) == select.best(errs)
    with pytest.raises(ValueError, match="calibration inputs"):
        cfg.choose_format("l2", w)


def _built_in(fmt_name, n=24, k=128, seed=0):
    """A weight exactly on ``fmt_name``'s grid with g128 parameters that RTN refits exactly (grid ends hit)."""
    g = torch.Generator().manual_seed(seed)
    fmt = formats.get_format(fmt_name)
    codes = torch.tensor(fmt.valid_codes)[torch.randint(0, len(fmt.valid_codes), (n, k), generator=g)]
    codes[:, 0] = max(fmt.valid_codes, key=lambda c: fmt.grid[c])
    codes[:, 1] = min(fmt.valid_codes, key=lambda c: fmt.grid[c])
    scale = (torch.rand(n, 1, generator=g) * 0.02 + 0.01).half().float()
    p = {"scales": scale, "zeros": torch.full((n, 1), 3.0)} if fmt.scheme == "zero_point" else \
        {"scales_pos": scale, "scales_neg": (scale * 0.3).half().float()}
    return formats.decode(fmt, codes.to(torch.uint8), p)


@pytest.mark.parametrize("target", ["int4_asym", "fp4_asym", "nf4_asym"])
def test_mofq_relative_output_error_picks_the_format_a_layer_was_built_in(target):
    w = _built_in(target)
    x, _ = _layer_problem(k=128)
    cfg = MoFQConfig(bits=4, group_size=128, selection="relative_output_error")
    assert cfg.needs_calibration() and "relative_output_error" in cfg.needs_calibration()
    errs = select.output_errors(w, x, cfg.candidates, 128, torch.float16, cfg.act_format, relative=True)
    assert errs[target] < 1e-12 and all(e > 1e-9 for c, e in errs.items() if c != target), errs
    assert cfg.choose_format("l", w, x) == target


@pytest.mark.parametrize("act_bits", [None, 8])
def test_mofq_relative_output_error_is_the_per_token_normalised_error(act_bits):
    x, w = _layer_problem(k=96)
    x[3] = 0.0  # a token with no output is skipped, not a division by zero
    cfg = MoFQConfig(bits=8 if act_bits else 4, group_size=32, act_bits=act_bits)
    got = select.output_errors(w, x, cfg.candidates, 32, torch.float16, cfg.act_format, relative=True)
    y = x @ w.T
    for c in cfg.candidates:
        xq = x if act_bits is None else formats.quantize_per_token(formats.get_format(cfg.act_format(c)), x)
        e = (xq @ select.rtn_dequant(w, c, 32, torch.float16).T - y).pow(2).sum(1)
        keep = y.pow(2).sum(1) > 0
        ref = (e[keep] / y.pow(2).sum(1)[keep]).sum().item() / len(x)
        assert got[c] == pytest.approx(ref, rel=1e-4), c


def test_mofq_relative_output_error_is_not_decided_by_one_sink_token():
    """One attention-sink-like token (a 1e3 activation on one channel) decides the mean squared error alone;
    the relative error picks what the other tokens prefer, as both criteria do without that token."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 128), generator=g).float()
    q[:, 1], q[:, 2] = 0, 15  # every row spans the INT4-asym grid, so INT4-asym fits it almost exactly
    w = (q - 7) * 0.01
    w[:, 0] = 0.5 * 8 * 0.01 / 6  # column 0 on the FP4-asym grid (scale_pos = max / 6), between two INT steps
    x = torch.randn(512, 128, generator=g)
    x[0] = 0.0
    x[0, 0] = 1e3
    cands = ["int4_asym", "fp4_asym"]
    mse = MoFQConfig(bits=4, group_size=128, candidates=cands, selection="output_error")
    rel = MoFQConfig(bits=4, group_size=128, candidates=cands, selection="relative_output_error")
    assert mse.choose_format("l", w, x) == "fp4_asym"
    assert rel.choose_format("l", w, x) == "int4_asym"
    assert mse.choose_format("l", w, x[1:]) == rel.choose_format("l", w, x[1:]) == "int4_asym"
    assert "selection by relative_output_error" in (rel.record_choice("l", "int4_asym") or rel.summary())


def test_w8a8_layer_quantizes_activations():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    wo = QuantLinear.from_linear(lin, "int8_sym", None)
    wa = QuantLinear.from_linear(lin, "int8_sym", None, act_fmt="int8_sym")
    x = torch.randn(3, 64)
    assert not torch.equal(wa(x), wo(x)) and torch.allclose(wa(x), lin(x), atol=0.05)
    xq = formats.quantize_per_token(formats.get_format("int8_sym"), x)
    assert torch.allclose(wa(x), nn.functional.linear(xq, wa.dequantize(), lin.bias), atol=1e-6)


def test_cli_quantize_gptq_and_reload(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_efficient.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--method", "mofq", "--bits", "4",
               "--algorithm", "gptq", "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "64", "--act-order", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "quantized 14 linear layers with mofq (gptq)" in text and "MoFQ W4: 14 layers" in text
    m = AutoModelForCausalLM.from_pretrained(out)
    cfg = m.config.quantization_config
    assert cfg.algorithm == "gptq" and cfg.act_order and len(cfg.layer_formats) == 14
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)
    # a hub config through the CLI, W8A8 with calibration-based selection
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "w8a8"), "--config", "mofq-w8a8",
               "--calib-samples", "2", "--calib-seqlen", "32", "--no-progress"])
    assert rc == 0 and "MoFQ W8A8: 14 layers" in capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8")
    assert m.model.layers[0].self_attn.q_proj.act_fmt is not None


def test_cli_bad_input(tiny_llama_dir, tmp_path, capsys):
    from hf_efficient.cli import main

    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x"), "--fmt", "nf", "--bits",
                 "8"]) == 2
    assert "no asymmetric NF format with bits=8" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "no" / "such" / "x")]) == 2


# ---- peft LoRA ------------------------------------------------------------------------------------

def test_lora_on_quantized_model_trains_only_adapters(tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from conftest import tiny_llama_config

    from hf_efficient.integrations.peft import QuantLoraLinear, get_peft_model, load_adapter

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "f")
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tmp_path / "f", quantization_config=AFPQConfig(bits=4, group_size=32, fmt="nf"))
    model = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                              target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 8
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the base weights as checkpoints see them (a kernel may adopt its own layout on the first forward)
    packed = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    base = {n: t for n, t in model.state_dict().items() if "lora_" not in n}
    assert base.keys() == packed.keys() and all(torch.equal(packed[n], t) for n, t in base.items())  # base untouched
    with pytest.raises(NotImplementedError, match="re-quantization"):
        wrapped[0].merge()
    model.save_pretrained(tmp_path / "adapter")
    again = load_adapter(load(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
