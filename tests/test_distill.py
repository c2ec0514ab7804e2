"""BitDistiller: fake quantization vs the packed layers, STE, clipping search, CAKLD, export round-trip."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_efficient.distill import (BitDistillerConfig, FakeQuantLinear, convert, distill_loss, fake_quant_disabled,
                                  fake_quantize_weight, kl_per_token, prepare_qat, search_clip)
from hf_efficient.distill.clip import group_output_error
from hf_efficient.distill.fake_quant import ste_quantize
from hf_efficient.quantization.linear import QuantLinear

FORMATS = [("int2_asym", 64), ("int3_asym", 128), ("int4_asym", 32), ("nf3_asym", 64), ("fp4_asym", 16),
           ("int3_sym", 64)]


# ------------------------------------------------------------------------------------------------
# fake quantization
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,gs", FORMATS)
@pytest.mark.parametrize("k", [96, 100])  # 100: a short last group for every group size here
def test_fake_quant_equals_packed_layer(fmt, gs, k):
    lin = nn.Linear(k, 24, bias=True)
    lin.weight.data[3, :5] = 0.0  # an all-zero part of a group
    lin.weight.data[5] *= 20      # a large-scale row
    q = fake_quantize_weight(lin.weight, fmt, gs, torch.float16)
    packed = QuantLinear.from_linear(lin, fmt, gs, torch.float16)
    assert torch.equal(q, packed.dequantize(torch.float32))


def test_fake_quant_per_channel_and_bf16():
    w = torch.randn(8, 40).to(torch.bfloat16)
    lin = nn.Linear(40, 8, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(w)
    q = fake_quantize_weight(w, "int3_asym", -1, torch.float32)
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, QuantLinear.from_linear(lin, "int3_asym", -1, torch.float32).dequantize(torch.bfloat16))


def test_ste_gradient_is_identity():
    w = torch.randn(16, 64, requires_grad=True)
    x = torch.randn(5, 64)
    g_out = torch.randn(5, 16)
    (torch.nn.functional.linear(x, ste_quantize(w, "int2_asym", 32)) * g_out).sum().backward()
    q = fake_quantize_weight(w, "int2_asym", 32).requires_grad_(True)
    (torch.nn.functional.linear(x, q) * g_out).sum().backward()
    assert torch.equal(w.grad, q.grad)  # dL/dW = dL/dQ(W): the rounding is passed straight through
    assert not torch.equal(w.grad, torch.zeros_like(w))


def test_fake_quant_linear_forward_cache_and_disable():
    lin = nn.Linear(64, 8)
    fq = FakeQuantLinear.from_linear(lin, "int2_asym", 32)
    assert fq.weight is lin.weight and fq.bias is lin.bias  # shared, so an optimizer keeps them
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, fake_quantize_weight(lin.weight, "int2_asym", 32), lin.bias)
    with torch.no_grad():
        assert torch.equal(fq(x), want)
        fq.weight.mul_(0.5)  # an in-place update must invalidate the cached quantized weight
        want2 = torch.nn.functional.linear(x, fake_quantize_weight(fq.weight, "int2_asym", 32), lin.bias)
        assert torch.equal(fq(x), want2)
    fq.quant_enabled = False
    assert torch.allclose(fq(x), torch.nn.functional.linear(x, fq.weight, fq.bias))


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def _hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_cakld_against_hand_computed_value():
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    beta = 0.3
    # Position 0 predicts token 1 (both scored); position 2 is the last one and never scored.
    s_logits = torch.tensor([s + [[0.0, 0.0, 0.0]]])
    t_logits = torch.tensor([t + [[9.0, 0.0, 0.0]]])
    ps, pt = [_softmax(r) for r in s], [_softmax(r) for r in t]
    rkl = [_hand_kl(a, b) for a, b in zip(ps, pt)]
    fkl = [_hand_kl(b, a) for a, b in zip(ps, pt)]
    want = sum(beta * r + (1 - beta) * f for r, f in zip(rkl, fkl)) / 2
    got = distill_loss(s_logits, t_logits, kind="cakld", beta=beta)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert distill_loss(s_logits, t_logits, kind="fkl").item() == pytest.approx(sum(fkl) / 2, rel=1e-6)
    assert distill_loss(s_logits, t_logits, kind="rkl").item() == pytest.approx(sum(rkl) / 2, rel=1e-6)


def test_loss_masking_and_num_items():
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = -100
    per = kl_per_token(t[:, :-1], s[:, :-1])
    mask = labels[:, 1:] != -100
    assert torch.allclose(distill_loss(s, t, labels, kind="fkl"), per[mask].mean())
    assert torch.allclose(distill_loss(s, t, labels, kind="fkl", num_items_in_batch=torch.tensor(20)),
                          per[mask].sum() / 20)
    ce = torch.nn.functional.cross_entropy(s[:, :-1][mask], labels[:, 1:][mask])
    assert torch.allclose(distill_loss(s, None, labels, kind="ce"), ce)
    # CAKLD with beta 0 / 1 is forward / reverse KL.
    assert torch.allclose(distill_loss(s, t, labels, kind="cakld", beta=0.0), distill_loss(s, t, labels, kind="fkl"))
    assert torch.allclose(distill_loss(s, t, labels, kind="cakld", beta=1.0), distill_loss(s, t, labels, kind="rkl"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="cakld", beta=None), "beta"), (dict(kind="cakld", beta=1.5), "beta"),
    (dict(kind="kl"), "loss="), (dict(kind="fkl", teacher=None), "teacher"),
    (dict(kind="fkl", teacher=torch.zeros(1, 4, 7)), "shape"), (dict(kind="ce", labels=None), "labels")])
def test_loss_errors(kwargs, match):
    s = torch.randn(1, 4, 5)
    teacher = kwargs.pop("teacher", torch.randn(1, 4, 5))
    labels = kwargs.pop("labels", torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=match):
        distill_loss(s, teacher, labels, **kwargs)


# ------------------------------------------------------------------------------------------------
# clipping search
# ------------------------------------------------------------------------------------------------
def _brute_force_clip(w, x, cfg):
    """Reference: loop over rows, groups and candidate pairs, scoring ‖x_g (w_g − Q(clamp w_g))ᵀ‖²."""
    n, k = w.shape
    gs = cfg.group_size
    lo_out, hi_out = torch.zeros(n, k // gs), torch.zeros(n, k // gs)
    for g in range(k // gs):
        cols = slice(g * gs, (g + 1) * gs)
        for r in range(n):
            wg = w[r:r + 1, cols]
            hi0, lo0 = wg.max().clamp(min=0), wg.min().clamp(max=0)
            best = None
            for a in cfg.clip_ratios():
                for b in cfg.clip_ratios():
                    q = fake_quantize_weight(wg.clamp(lo0 * b, hi0 * a), cfg.weight_format, gs, cfg.scale_dtype)
                    err = ((x[:, cols] @ (wg - q).T) ** 2).sum().item()
                    if best is None or err < best[0]:
                        best = (err, lo0 * b, hi0 * a)
            lo_out[r, g], hi_out[r, g] = best[1], best[2]
    return lo_out, hi_out


@pytest.mark.parametrize("fmt,bits", [("int", 2), ("nf", 3)])
def test_clip_search_matches_brute_force(fmt, bits):
    cfg = BitDistillerConfig(bits=bits, fmt=fmt, group_size=16, clip_grid=4, clip_min_ratio=0.6)
    w = torch.randn(6, 32)
    w[1, 3] = 6.0  # an outlier that round-to-nearest wastes its range on
    x = torch.randn(40, 32)
    lo, hi = search_clip(w, x.T @ x, cfg)
    ref_lo, ref_hi = _brute_force_clip(w, x, cfg)
    # Candidates whose errors tie within float error may be picked differently: compare the errors reached.
    blocks_err = []
    for l_, h_ in ((lo, hi), (ref_lo, ref_hi)):
        wc = torch.minimum(torch.maximum(w, l_.repeat_interleave(16, 1)), h_.repeat_interleave(16, 1))
        q = fake_quantize_weight(wc, cfg.weight_format, 16, cfg.scale_dtype)
        blocks_err.append(((x @ (w - q).T) ** 2).sum().item())
    assert blocks_err[0] == pytest.approx(blocks_err[1], rel=1e-4)
    rtn = ((x @ (w - fake_quantize_weight(w, cfg.weight_format, 16, cfg.scale_dtype)).T) ** 2).sum().item()
    assert blocks_err[0] < rtn  # the outlier row gains


def test_group_output_error_short_group():
    w, q = torch.randn(3, 20), torch.randn(3, 20)
    x = torch.randn(7, 20)
    from hf_efficient.distill.clip import _group_blocks

    err = group_output_error(w, q, _group_blocks(x.T @ x, 8), 8)
    want = torch.stack([((x[:, s] @ (w - q)[:, s].T) ** 2).sum(0) for s in (slice(0, 8), slice(8, 16),
                                                                           slice(16, 20))], 1)
    assert torch.allclose(err, want, rtol=1e-4)


def test_search_clip_rejects_bad_hessian():
    with pytest.raises(ValueError, match="H of shape"):
        search_clip(torch.randn(4, 8), torch.eye(7), BitDistillerConfig())


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=5), "bits"), (dict(fmt="nf", bits=2), "bits"), (dict(fmt="mx"), "fmt"),
    (dict(group_size=0), "group_size"),
    (dict(loss="jsd"), "loss"), (dict(beta=2.0), "beta"), (dict(clip_grid=0), "clip_grid"),
    (dict(clip_min_ratio=0.0), "clip_min_ratio"), (dict(scale_dtype="int8"), "scale_dtype"),
    (dict(asymmetric="yes"), "asymmetric"), (dict(format_version=9), "format_version")])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"BitDistillerConfig.{field}="):
        BitDistillerConfig(**kwargs)


def test_config_round_trip_and_quant_config():
    cfg = BitDistillerConfig(bits=3, group_size=128, fmt="nf", loss="fkl")
    assert BitDistillerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        BitDistillerConfig.from_dict({**cfg.to_dict(), "lr": 1})
    qc = cfg.to_quant_config()
    assert qc.weight_format == "nf3_asym" == cfg.weight_format and qc.algorithm == "rtn"
    assert cfg.clip_ratios()[0] == 1.0 and cfg.clip_ratios()[-1] == pytest.approx(0.55)


# ------------------------------------------------------------------------------------------------
# model-level: prepare, clip init, export round-trip
# ------------------------------------------------------------------------------------------------
def _tiny(vocab=256):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    return LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)).eval()


def test_prepare_clip_convert_round_trip(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    cfg = BitDistillerConfig(bits=2, group_size=32, clip_grid=3, clip_samples=2, clip_seqlen=16)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    w_before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    prepare_qat(model, cfg, calibration=torch.randint(0, 256, (2, 16)), progress=False)
    fq = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == 2 * 7  # q,k,v,o,gate,up,down per layer; the tied head stays float
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FakeQuantLinear)
    w_after = model.model.layers[0].mlp.down_proj.weight.detach()
    assert (w_after.abs() <= w_before.abs() + 1e-7).all()  # clipping only shrinks
    with torch.no_grad():
        with fake_quant_disabled(model):
            assert torch.allclose(model(ids).logits, ref, atol=0.5)  # clipped float: close, not equal
        fake = model(ids).logits
    convert(model, cfg)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    with torch.no_grad():
        exported = model(ids).logits
    assert torch.allclose(exported, fake, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.quant_method == "afpq"
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, fake, atol=1e-5, rtol=1e-5)


def test_convert_refuses_unprepared_model():
    with pytest.raises(ValueError, match="prepare_qat"):
        convert(_tiny(), BitDistillerConfig())


def test_zero_point_closed_form_equals_catalog_encode_at_ties():
    from hf_efficient import formats
    from hf_efficient.distill.fake_quant import _zero_point_round_trip

    fmt = formats.get_format("int3_asym")
    s = torch.full((1, 1), 0.25)
    z = torch.full((1, 1), 3.0)
    # x = w/s + z lands exactly on every midpoint c + 0.5, on the codes, outside the range, and near 0.
    x = torch.cat([torch.arange(-2, 10, 0.5), torch.tensor([0.49999997, 0.5000001, -0.0, 1e-30, 7.5, 7.4999995])])
    w = ((x - 3.0) * 0.25)[None]
    want = formats.decode(fmt, formats.encode(fmt, w, {"scales": s, "zeros": z}), {"scales": s, "zeros": z})
    assert torch.equal(_zero_point_round_trip(fmt, w, s, z), want)
