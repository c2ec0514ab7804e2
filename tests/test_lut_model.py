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
    assert qlayers and all(m._lut_enabled and m.layout is not None and m.layout.kind == "cpu-lut" for m in qlayers)
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


@pytest.mark.parametrize("method", ["afpq-fp4", "afpq-nf4", "mofq-w4"])
def test_afpq_and_mofq_models_run_the_cpu_kernels_by_default(tiny_dir, method):
    """The kernel is chosen by device and format: AFPQ (two-scale FP/NF) and MoFQ W4 models on the CPU run
    every linear on the LUT engine without enable_lut, converting each layer on its first forward."""
    from hf_efficient import AFPQConfig, load_quant_config

    cfg = {"afpq-fp4": AFPQConfig(bits=4, group_size=32, fmt="fp"), "afpq-nf4": AFPQConfig(bits=4, group_size=32,
           fmt="nf"), "mofq-w4": load_quant_config("mofq-w4")}[method]  # the shipped recipe
    model = _load(tiny_dir, quantization_config=cfg)
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with reference_only():
            b = model(ids).logits
        a = model(ids).logits
    assert qlayers and all(m.layout is not None and m.layout.kind == "cpu-lut" for m in qlayers)
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


def test_default_on_adopts_one_copy_and_follows_reloads():
    """A plain QuantLinear on the CPU takes the LUT path without enable_lut; the stream becomes its only copy
    of the codes; checkpoints, dequantize and the gradient path are the stored layout's, bit for bit."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear.from_linear(lin, "int4_asym", group_size=32)
    x = torch.randn(3, 64)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    deq, ref = q.dequantize(), q.reference_forward(x)
    y = q(x)
    assert q.layout is not None and q.layout.kind == "cpu-lut" and q.qweight.numel() == 0
    assert not torch.equal(y, ref) and float((y - ref).norm() / ref.norm()) < 0.02  # LUT path, bias included
    after = q.state_dict()
    assert set(after) == set(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    assert torch.equal(q.dequantize(), deq)
    big = torch.randn(MAX_LUT_ROWS + 1, 64)  # prefill-sized: BLAS on dequantized blocks
    torch.testing.assert_close(q(big), torch.nn.functional.linear(big, deq, lin.bias), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    yg = q(xg)  # with gradients: F.linear on the dequantized stream, equal to the reference path
    assert torch.equal(yg, ref)
    yg.sum().backward()
    assert torch.equal(xg.grad, deq.sum(0).expand(3, -1))
    q.load_quantized(q.codes() ^ 1, q.params())  # new codes: back to the stored layout, re-adopted on use
    assert q.layout is None
    ref2 = q.reference_forward(x)
    assert float((q(x) - ref2).norm() / ref2.norm()) < 0.02 and q.layout.kind == "cpu-lut"
    enable_lut(q, enabled=False)
    assert q.layout is None and torch.equal(q(x), ref2)


@pytest.mark.parametrize("fmt", ["int2_asym", "int3_asym", "int4_asym", "int4_sym", "fp4_asym", "fp3_asym",
                                 "nf4_sym", "nf4_asym", "nf3_asym"])
def test_resident_stream_round_trips_every_format(fmt):
    q = QuantLinear.from_linear(torch.nn.Linear(200, 70, bias=False), fmt, group_size=64)
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    deq = q.dequantize()
    before = sum(t.numel() * t.element_size() for t in q.buffers())
    assert lut_layer.prepare_layer(q) is not None and q.layout.kind == "cpu-lut"
    held = sum(t.numel() * t.element_size() for t in q.buffers())
    stream = q.layout_tensor("stream").numel()
    assert held <= before - sd["qweight"].numel() * 4 + stream + 2 * 16 * 4  # one copy (+ a grid of <= 2 x 16)
    after = q.state_dict()
    assert all(torch.equal(after[k], sd[k]) for k in sd)
    assert torch.equal(q.dequantize(), deq)
    assert torch.equal(lut_layer._weight(q).dequantize(), deq)  # the prefill path's weights are the layer's


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


def _head_model(tiny_dir, **head):
    model = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    enable_lut(model, **head)
    return model


def test_lut_head_quantized_copy_keeps_float_weights_and_tie(tiny_dir):
    plain = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    names = enable_lut(plain, head_bits=4, head_group_size=32)
    head = plain.lm_head
    assert "lm_head" in names and isinstance(head, lut_layer.LUTHead)
    assert head.weight is plain.model.embed_tokens.weight  # still tied: the very same tensor
    after = plain.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    q = head.quantized()
    assert isinstance(q, QuantLinear) and q.fmt.bits == 4 and q.group_size == 32 and q._lut_enabled


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lut_head_forward_paths(tiny_dir, bits):
    model = _head_model(tiny_dir, head_bits=bits, head_group_size=32)
    head = model.lm_head
    q = head.quantized()
    g = torch.Generator().manual_seed(bits)
    deq = q.dequantize()
    with torch.no_grad():
        # Decode-sized input: the LUT kernel, close to the dequantized head (int8 tables).
        x1 = torch.randn(1, 1, 64, generator=g)
        y1 = head(x1)
        ref1 = torch.nn.functional.linear(x1, deq)
        assert float((y1 - ref1).norm() / ref1.norm()) < 0.02
        # Prefill-sized input: the dequantized copy exactly (same weights as decode, no float/quantized mix).
        xp = torch.randn(1, MAX_LUT_ROWS + 5, 64, generator=g)
        torch.testing.assert_close(head(xp), torch.nn.functional.linear(xp, deq), rtol=0, atol=1e-5)
    # With gradients: the float weight, and gradients reach it.
    x = torch.randn(2, 64, generator=g, requires_grad=True)
    y = head(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, head.weight))
    y.sum().backward()
    assert head.weight.grad is not None and x.grad is not None


def test_lut_head_follows_weight_changes_and_disables(tiny_dir):
    model = _head_model(tiny_dir, head_bits=4, head_group_size=32)
    head = model.lm_head
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = head(x)
        head.weight.mul_(2.0)  # in place: the copy must be rebuilt, not reused
        y2 = head(x)
        torch.testing.assert_close(y2, 2 * y, rtol=0.03, atol=1e-3)
        enable_lut(model, False)
        assert type(model.lm_head) is torch.nn.Linear and "_lut_head" not in model.lm_head.__dict__
        torch.testing.assert_close(model.lm_head(x), torch.nn.functional.linear(x, head.weight))


def test_lut_head_generate_matches_reference_head(tiny_dir):
    model = _head_model(tiny_dir, head_bits=4, head_group_size=32)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    with torch.no_grad():
        a = model(ids[:, :1]).logits
        with reference_only():
            b = model(ids[:, :1]).logits
    assert float((a - b).norm() / b.norm()) < 0.03


@pytest.mark.parametrize("kw, match", [(dict(head_bits=5), "head_bits must be 2, 3, 4 or 8"),
                                       (dict(head_bits=4, head_group_size=24), "multiple of 16")])
def test_lut_head_bad_settings(tiny_dir, kw, match):
    model = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=match):
        enable_lut(model, **kw)


def _int8_reference(w, group_size):
    from hf_efficient.quantization.linear import rtn_quantize

    ref = QuantLinear(w.shape[1], w.shape[0], "int8_asym", group_size)
    ref.load_quantized(*rtn_quantize(w, ref.fmt, group_size, torch.float16))
    return ref.dequantize()


@pytest.mark.parametrize("n, k, group_size, kind", [
    (70, 200, 32, "randn"), (33, 16, 32, "randn"),  # K smaller than a group
    (17, 96, 16, "zeros"), (40, 64, 32, "extreme"), (9, 48, 48, "constant_rows"), (64, 128, 64, "bias")])
def test_nibble_head_is_the_int8_head(n, k, group_size, kind):
    """The INT8 head as two INT4 halves: its dequantized weight is the INT8 zero-point one (round to nearest, same
    groups) exactly, the LUT kernel's output is that weight's product within the int8 tables' error, prefill-sized
    inputs match it to float rounding; random, zero, extreme (mixed 1e-4 and 1e3 groups) and constant rows."""
    g = torch.Generator().manual_seed(n * k)
    lin = torch.nn.Linear(k, n, bias=kind == "bias")
    with torch.no_grad():
        w = {"randn": torch.randn(n, k, generator=g), "zeros": torch.zeros(n, k),
             "extreme": torch.randn(n, k, generator=g) * torch.where(torch.arange(k) < k // 2, 1e-4, 1e3),
             "constant_rows": torch.arange(n, dtype=torch.float32)[:, None].expand(n, k) - 4}.get(
                 kind, torch.randn(n, k, generator=g))
        lin.weight.copy_(w)
    head = lut_layer.NibbleHead.from_linear(lin, group_size)
    assert head.q._lut_enabled and head.q.fmt.bits == 4 and head.q.out_features == 2 * n
    assert head.q.layout is not None and head.q.layout.kind == lut_layer.KIND  # on the LUT kernels
    deq = _int8_reference(lin.weight.detach(), group_size)
    assert torch.equal(head.dequantize(), deq)
    with torch.no_grad():
        x = torch.randn(1, k, generator=g)
        ref = torch.nn.functional.linear(x, deq, lin.bias)
        y = head(x)
        assert y.shape == (1, n)
        assert float((y - ref).norm()) <= 0.02 * float(ref.norm()) + 1e-6
        xp = torch.randn(3, MAX_LUT_ROWS + 2, k, generator=g)
        refp = torch.nn.functional.linear(xp, deq, lin.bias)
        torch.testing.assert_close(head(xp), refp, rtol=1e-5, atol=1e-5 * float(refp.abs().max()))


def test_int8_head_is_closer_to_the_float_head(tiny_dir):
    """head_bits=8 on the tiny model: its logits' error against the float head is a small fraction of the INT4
    head's (what the 8 bits are for), and generate runs on it."""
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(8))
    err = {}
    for bits in (4, 8):
        model = _head_model(tiny_dir, head_bits=bits, head_group_size=32)
        assert isinstance(model.lm_head.quantized(), lut_layer.NibbleHead if bits == 8 else QuantLinear)
        with torch.no_grad():
            h = model.model(ids).last_hidden_state
            exact = torch.nn.functional.linear(h, model.lm_head.weight)
            err[bits] = float((model.lm_head(h) - exact).norm() / exact.norm())
    assert err[8] < err[4] / 3, err
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_int8_head_under_torch_compile(tiny_dir):
    """The INT8 head traces into one graph (its LUT op and the halves' sum) and matches eager exactly."""
    head = _head_model(tiny_dir, head_bits=8, head_group_size=32).lm_head
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(head, fullgraph=True)(x), head(x), rtol=0, atol=0)


def test_int8_head_refuses_scales_beyond_float16():
    lin = torch.nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-1e7, 1e7, 128).view(4, 32))
    with pytest.raises(ValueError, match="too large"):
        lut_layer.NibbleHead.from_linear(lin, 32)


def test_lut_head_refuses_quantized_head(tiny_dir):
    model = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    model.lm_head = QuantLinear.from_linear(torch.nn.Linear(64, 256), "int4_asym", 32)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        enable_lut(model, head_bits=4)


def test_lut_layers_run_under_torch_compile(tiny_dir):
    """The adopted stream is read inside the compiled graph: every quantized layer is one lut_gemm node of a
    single graph (no graph break), and the compiled forward matches eager."""
    model = _load(tiny_dir, quantization_config=LUTConfig(bits=4, group_size=32))
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(5))
    nq = sum(isinstance(m, QuantLinear) for m in model.modules())
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.target is torch.ops.hf_efficient.lut_gemm.default]
    assert len(nodes) == nq
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
