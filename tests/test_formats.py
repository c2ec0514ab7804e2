"""Formats catalog, scale rules, bit packing and the QuantLinear reference path (fast, random shapes)."""
from __future__ import annotations

import math

import pytest
import torch

from hf_efficient import formats
from hf_efficient.quantization import QuantLinear, pack_codes, reference_only, register_fast_path, unpack_codes
from hf_efficient.quantization.linear import group_params, rtn_quantize, unregister_fast_path
from hf_efficient.quantization.packing import expand_groups

ALL = sorted(formats.FORMATS)


def test_catalog_grids():
    f = formats.get_format
    assert f("fp4_sym").grid[:8] == (0, 0.5, 1, 1.5, 2, 3, 4, 6)
    assert f("fp4_sym").grid[8:] == tuple(-v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6))
    assert sorted(set(f("fp3_asym").grid)) == [-4, -2, -1, 0, 1, 2, 4]
    assert f("int4_sym").grid == tuple(float(v) for v in range(-8, 8))
    assert f("int3_asym").grid == tuple(float(v) for v in range(8))
    assert f("nf4_asym").grid[0] == -1 and f("nf4_asym").grid[-1] == 1 and f("nf4_asym").grid[7] == 0
    assert f("nf3_sym").bits == 3 and len(f("nf3_sym").grid) == 8
    fp8 = f("fp8_e4m3")
    finite = [v for v in fp8.grid if not math.isnan(v)]
    assert max(finite) == 448 and len(finite) == 254 and fp8.grid[1] == 2 ** -9
    # our FP8 grid is exactly torch's float8_e4m3fn decoding of each byte
    ref = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.nan_to_num(fp8.values(), nan=-1.0), torch.nan_to_num(ref, nan=-1.0))
    for name in ALL:
        assert f(name).values().shape == (2 ** f(name).bits,)


@pytest.mark.parametrize("bad", ["fp5_sym", "nf8_asym", "int5_sym", "fp8_asym", "bogus"])
def test_unknown_format_lists_known(bad):
    with pytest.raises(ValueError, match="known formats"):
        formats.get_format(bad)


@pytest.mark.parametrize("kind,bits,sym", [("fp", 2, True), ("nf", 8, False), ("int", 5, True), ("fp", 8, False),
                                           ("xx", 4, True)])
def test_nonexistent_combinations(kind, bits, sym):
    with pytest.raises(ValueError):
        formats.format_name(kind, bits, sym)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 10, 32, 33, 576, 1536])
def test_pack_roundtrip_exact(bits, k):
    g = torch.Generator().manual_seed(k * bits)
    codes = torch.randint(0, 2 ** bits, (3, 2, k), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2, -(-k // (32 // bits)))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_layout_documented():
    # code k sits at bits [(k % per) * bits, ...) of word k // per, least significant first
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    w = pack_codes(codes, 4)
    assert w.shape == (1, 2)
    assert int(w[0, 0]) & 0xFFFFFFFF == 0xF7654321 and int(w[0, 1]) == 9
    assert int(w[0, 0]) < 0  # bit 31 set -> negative int32, extraction still works
    three = pack_codes(torch.full((1, 10), 7, dtype=torch.uint8), 3)
    assert int(three[0, 0]) == 2 ** 30 - 1  # 10 codes of 3 bits, bits 30-31 unused


def test_pack_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="< 2\\*\\*4"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="words"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 8)


def _effective_values(fmt, params_row):
    """Every value a row can decode to, by brute force over codes (the oracle for nearest rounding)."""
    codes = torch.tensor(fmt.valid_codes, dtype=torch.uint8)
    return formats.decode(fmt, codes, {k: v.expand(len(codes)) for k, v in params_row.items()})


@pytest.mark.parametrize("name", ALL)
def test_encode_is_nearest_and_roundtrips(name):
    fmt = formats.get_format(name)
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.tensor([1e-3, 1, 10, 0.1, 5, 2])[:, None]
    w[5] += 0.7  # a mostly positive row
    codes, params = rtn_quantize(w, fmt, 40, torch.float16)
    deq = formats.decode(fmt, codes, {k: v.expand(-1, 40) for k, v in params.items()})
    for r in range(6):
        vals = _effective_values(fmt, {k: v[r] for k, v in params.items()})
        best = (w[r, :, None] - vals[None]).abs().min(1).values
        assert torch.allclose((w[r] - deq[r]).abs(), best, rtol=1e-5, atol=1e-7), name
    # decode -> encode -> decode is exact (codes of representable values are stable)
    again = formats.encode(fmt, deq, {k: v.expand(-1, 40) for k, v in params.items()})
    assert torch.equal(formats.decode(fmt, again, {k: v.expand(-1, 40) for k, v in params.items()}), deq)
    # within range, the error is at most half the widest gap of the effective grid
    for r in range(6):
        vals = torch.sort(_effective_values(fmt, {k: v[r] for k, v in params.items()})).values
        assert (w[r] - deq[r]).abs().max() <= (vals[1:] - vals[:-1]).max() / 2 + 1e-4 * w[r].abs().max()


@pytest.mark.parametrize("name", ALL)
def test_zero_and_constant_groups(name):
    fmt = formats.get_format(name)
    w = torch.zeros(4, 64)
    w[1] = 0.37  # constant positive
    w[2] = -2.5  # constant negative
    w[3, :32] = 0.0
    w[3, 32:] = torch.linspace(-1, 1, 32)
    codes, params = rtn_quantize(w, fmt, 32, torch.float32)
    assert all(torch.isfinite(p).all() for p in params.values())
    deq = formats.decode(fmt, codes, {k: expand_groups(v, 64, 32) for k, v in params.items()})
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(64)) and torch.equal(deq[3, :32], torch.zeros(32))
    assert (deq[w == 0] == 0).all()  # zeros round-trip exactly wherever they are
    # constants survive up to the precision of the stored scale
    for r, c in ((1, 0.37), (2, -2.5)):
        assert torch.allclose(deq[r], torch.full((64,), c), rtol=1e-6, atol=0)


def test_two_scale_rule_uses_sign_of_code():
    fmt = formats.get_format("fp4_asym")
    w = torch.tensor([[6.0, 3.0, -0.6, -0.3, 0.0, 1.5, -0.15, 0.0]])
    codes, params = rtn_quantize(w, fmt, 8, torch.float32)
    assert params["scales_pos"].item() == 1.0 and params["scales_neg"].item() == pytest.approx(0.1)
    deq = formats.decode(fmt, codes, {k: v.expand(-1, 8) for k, v in params.items()})
    assert torch.allclose(deq, w, atol=1e-6)  # both halves exactly on their own grids
    sym = formats.get_format("fp4_sym")
    c2, p2 = rtn_quantize(w, sym, 8, torch.float32)
    assert (formats.decode(sym, c2, {k: v.expand(-1, 8) for k, v in p2.items()}) - w).abs().max() > 0.1


def test_short_last_group_equals_separate_fit():
    torch.manual_seed(1)
    w = torch.randn(5, 576)
    fmt = formats.get_format("nf4_asym")
    p = group_params(fmt, w, 128, torch.float16)
    assert p["scales_pos"].shape == (5, 5)
    tail = formats.fit_params(fmt, w[:, 512:], torch.float16)
    assert torch.equal(p["scales_pos"][:, 4], tail["scales_pos"]) and torch.equal(p["scales_neg"][:, 4],
                                                                                  tail["scales_neg"])


@pytest.mark.parametrize("name", ["int4_asym", "fp4_asym", "nf3_sym", "int8_sym", "fp8_sym", "int2_asym"])
@pytest.mark.parametrize("k,group", [(576, 128), (96, None), (100, 32), (33, 64)])
def test_quantlinear_reference(name, k, group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 24, bias=True)
    q = QuantLinear.from_linear(lin, name, group)
    x = torch.randn(2, 3, k)
    w = q.dequantize()
    with reference_only():  # the plain-torch path; the CPU kernels are checked against it in test_lut_model
        assert torch.allclose(q(x), torch.nn.functional.linear(x, w, lin.bias), atol=1e-5)
    assert torch.equal(q.codes(), rtn_quantize(lin.weight, q.fmt, q.group_size, torch.float16)[0])
    rel = ((w - lin.weight) ** 2).mean() / (lin.weight ** 2).mean()
    assert rel < {2: 0.2, 3: 0.06, 4: 0.02, 8: 1e-3}[q.fmt.bits]
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_nan_inf_weights_name_the_layer():
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
        lin.weight[2, 3] = float("inf")
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.*NaN/Inf"):
        QuantLinear.from_linear(lin, "int4_asym", 8, name="model.layers.3.mlp.up_proj")


def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(16, 4, "int4_sym", group_size=-5)


def test_fast_path_registry():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), "fp4_asym", 32)
    x = torch.randn(4, 64)
    calls = []

    def declines(x, layer):
        calls.append("declines")
        return None

    def doubles(x, layer):
        calls.append("doubles")
        return 2 * layer.reference_forward(x)

    default = q(x)  # whatever the registered CPU path computes
    with reference_only():
        ref = q(x)
    register_fast_path("fp", 4, "cpu", doubles, name="t-doubles")
    register_fast_path("fp4_asym", 4, "cpu", declines, name="t-declines")
    try:
        assert torch.allclose(q(x), 2 * ref) and calls == ["declines", "doubles"]
        with reference_only():
            assert torch.equal(q(x), ref)
        other = QuantLinear.from_linear(torch.nn.Linear(64, 8), "int4_sym", 32)
        calls.clear()
        other(x)
        assert calls == []  # keyed by format: an INT layer never sees FP kernels
    finally:
        unregister_fast_path("fp", 4, "cpu", "t-doubles")
        unregister_fast_path("fp4_asym", 4, "cpu", "t-declines")
    assert torch.equal(q(x), default)  # unregistering restores the earlier path
    with pytest.raises(ValueError, match="known formats"):
        register_fast_path("fp9", 9, "cpu", doubles)
    with pytest.raises(ValueError, match="device_type"):
        register_fast_path("fp", 4, "tpu", doubles)


def test_activation_quantization_per_token():
    x = torch.randn(5, 64) * torch.logspace(-2, 2, 5)[:, None]
    for name in ("int8_sym", "fp8_sym"):
        xq = formats.quantize_per_token(formats.get_format(name), x)
        rel = (xq - x).abs().amax(-1) / x.abs().amax(-1)
        assert (rel < 0.07).all() and (xq != x).any()
    fp8 = formats.quantize_per_token(formats.get_format("fp8_sym"), x)
    s = x.abs().amax(-1, keepdim=True) / 448
    torch_fp8 = (x / s).to(torch.float8_e4m3fn).float() * s
    assert (fp8 - torch_fp8).abs().max() <= 1e-6 * x.abs().max() or (fp8 != torch_fp8).float().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int4_asym", "fp4_asym", "nf3_asym", "int8_sym", "fp8_sym", "int2_sym"])
def test_quantlinear_cuda_matches_cpu(name):
    """Quantizing and the reference forward on CUDA give the CPU's codes; any registered fast path agrees."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192, bias=True)
    cpu = QuantLinear.from_linear(lin, name, 128)
    gpu = QuantLinear.from_linear(lin.cuda(), name, 128)
    for t in ["qweight", *cpu.fmt.param_names]:
        assert torch.equal(getattr(gpu, t).cpu(), getattr(cpu, t)), t
    x = torch.randn(5, 576)
    with reference_only():
        ref_gpu = gpu(x.cuda())
        ref_cpu = cpu(x)
    assert torch.allclose(ref_gpu.cpu(), ref_cpu, atol=1e-4, rtol=1e-4)
    # the CPU's own fast path (the LUT engine, activations rounded per table) has its bounds in test_lut_*.py
    for dtype in (torch.float16, torch.bfloat16):
        fast = gpu(x.cuda().to(dtype)).float()
        assert torch.allclose(fast.cpu(), ref_cpu, atol=0.05, rtol=0.05), dtype
