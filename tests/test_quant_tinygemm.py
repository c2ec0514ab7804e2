"""INT4 layers in torch's tinygemm layout (kernels/quant_tinygemm.py): exact round trip of codes and parameters,
the Triton dequantizer against its reference (interpreter on CPU), eligibility, the QuantLinear path, and on
CUDA the layout against torch's own packer and the tinygemm product against the reference bound."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_efficient import formats
from hf_efficient.kernels import quant_tinygemm as T
from hf_efficient.kernels.quant_reference import ETA, U, random_kernel_weight

SHAPES = [(8, 32, 32), (16, 64, 64), (24, 96, 32), (40, 256, 128), (8, 512, 256), (16, 384, 128)]


def _weight(name, n, k, group, scale_dtype=torch.float16, special=None, device="cpu"):
    fmt, codes, kw = random_kernel_weight(name, n, k, group, scale_dtype=scale_dtype, special=special)
    b = kw.params[1] if fmt.scale_scheme.offset else None
    w = T.pack(codes.to(device), kw.params[0].to(device), None if b is None else b.to(device), fmt.grid, group,
               fmt.scale_scheme.mode)
    return fmt, codes, kw, w


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["int4_asym", "int4_sym"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_round_trip_is_exact(shape, name, scale_dtype):
    n, k, group = shape
    fmt, codes, kw, w = _weight(name, n, k, group, scale_dtype, special="extreme")
    assert w.qweight.shape == (n // 8, k // (16 * T.inner_k_tiles(k)), 32, T.inner_k_tiles(k) // 2)
    assert w.sz.dtype == torch.bfloat16 and w.sz.shape == (k // group, n, 2)
    # bfloat16 scales need no second copy; float16/float32 ones are kept for an exact save
    assert (w.scale.numel() == 0) == (scale_dtype == torch.bfloat16)
    c2, a2, b2 = T.unpack(w)
    assert torch.equal(c2, codes) and a2.dtype == scale_dtype and torch.equal(a2, kw.params[0])
    if fmt.scale_scheme.offset:
        assert torch.equal(b2, kw.params[1].float())
    else:
        assert b2 is None


@pytest.mark.parametrize("name", ["int4_asym", "int4_sym"])
def test_dequantize_matches_format_decode(name):
    """tinygemm's (q - 8) s + zf is our decode up to one bfloat16 rounding of s and zf."""
    from hf_efficient.kernels.quant_reference import dequantize_reference

    fmt, codes, kw, w = _weight(name, 24, 256, 64, special="zero" if name == "int4_sym" else None)
    ours = dequantize_reference(kw)
    theirs = T.dequantize_reference(w)
    a = kw.params[0].float().repeat_interleave(64, 1)
    # |q - 8| s and |zf| each carry 2**-9 relative (bf16 rounding of s and of zf)
    bound = 2.0 ** -8 * 16 * a.abs() + 1e-6
    assert ((theirs - ours).abs() <= bound).all()
    if name == "int4_sym":  # zf = 0: only the scale's rounding
        s = kw.params[0].to(torch.bfloat16).float().repeat_interleave(64, 1)
        assert torch.equal(theirs, (codes.float() - 8) * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 32, 32), (24, 96, 32), (16, 64, 64), (40, 256, 256), (16, 384, 64),
                                   (32, 1024, 32), (8, 512, 128)], ids=lambda s: "x".join(map(str, s)))
def test_triton_dequantizer_equals_reference(shape, dtype):
    """Every inner-k-tile count (2, 4, 8) and 1, 2 or 4 groups per K super-tile, or a group over two."""
    from hf_efficient.kernels.quant_reference import INTERP_BF16_OUT
    from hf_efficient.kernels.quant_tinygemm_dequant import dequantize_triton

    n, k, group = shape
    _, _, _, w = _weight("int4_asym", n, k, group, special="extreme")
    got = dequantize_triton(w.qweight, w.sz, n, k, group, dtype)
    ref = T.dequantize_reference(w, torch.float32)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16: within one ulp, not rounded
        assert ((got.float() - ref).abs() <= INTERP_BF16_OUT * ref.abs()).all()
    else:
        assert torch.equal(got, ref.to(dtype))


def test_unsupported_says_why():
    g = formats.get_format
    a = torch.ones(8, 2)
    assert T.unsupported(4, g("int4_asym").grid, 1, 64, 8, 128, a, a) is None
    assert "uniform INT4" in T.unsupported(4, g("nf4_asym").grid, 1, 64, 8, 128, a, a)
    assert "uniform INT4" in T.unsupported(3, g("int3_asym").grid, 1, 64, 8, 128, a, a)
    assert "two-scale" in T.unsupported(4, g("int4_asym").grid, 2, 64, 8, 128, a, a)
    assert "group_size" in T.unsupported(4, g("int4_asym").grid, 1, 16, 8, 128, a, a)
    assert "multiple" in T.unsupported(4, g("int4_asym").grid, 1, 64, 12, 128, a, a)
    assert "multiple" in T.unsupported(4, g("int4_asym").grid, 1, 64, 8, 96, a[:, :1], a[:, :1])
    z = a.clone()
    z[3, 1] = 0
    assert "zero scale" in T.unsupported(4, g("int4_asym").grid, 1, 64, 8, 128, z, a)
    assert T.unsupported(4, g("int4_sym").grid, 0, 64, 8, 128, z, None) is None  # sym: zf = 0 whatever s is
    assert "overflows" in T.unsupported(4, g("int4_sym").grid, 0, 64, 8, 128, a * 1e39, None)
    with pytest.raises(ValueError, match="tinygemm cannot hold"):
        T.pack(torch.zeros(12, 128, dtype=torch.uint8), a[:1].expand(12, 2), None, g("int4_sym").grid, 64, 0)


def test_op_reference_and_fake():
    _, _, _, w = _weight("int4_asym", 16, 128, 64)
    x = torch.randn(3, 128).half()
    args = (x, w.qweight, w.sz, 16, 128, 64)
    torch.library.opcheck(torch.ops.hf_efficient.quant_tinygemm.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    y = torch.ops.hf_efficient.quant_tinygemm(*args)
    ref = (x.float() @ T.dequantize_reference(w).t()).half()
    assert y.dtype == torch.float16 and torch.equal(y, ref)


@pytest.fixture
def cpu_fast_path():
    from hf_efficient.quantization import register_fast_path, unregister_fast_path
    from hf_efficient.quantization.gpu import quant_linear_forward

    register_fast_path("*", 4, "cpu", quant_linear_forward, name="test-tiny")
    yield
    unregister_fast_path("*", 4, "cpu", "test-tiny")


@pytest.mark.parametrize("name,group", [("int4_asym", 32), ("int4_sym", 128)])
def test_quant_linear_takes_tinygemm_layout_at_bf16(cpu_fast_path, name, group):
    from hf_efficient.quantization import QuantLinear, reference_only
    from hf_efficient.quantization.gpu import force_kernel

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 48, bias=True), name, group)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 256).bfloat16()
    with reference_only():
        ref = layer(x).float()
    y = layer(x)
    assert layer.layout.kind == "cuda-tinygemm" and layer.qweight.numel() == 0
    assert all(torch.equal(v, stored[k]) for k, v in layer.state_dict().items())  # saving is exact
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()) < 1e-2
    # an fp16 call on the adopted layout is served by it (activations rounded to bf16 on CUDA)
    assert layer(x.half()).dtype == torch.float16 and layer.layout.kind == "cuda-tinygemm"
    with force_kernel("gemv"):  # a forced Triton kernel moves the layer to the Triton layout
        layer(x)
        assert layer.layout.kind == "cuda-triton"
    assert all(torch.equal(v, stored[k]) for k, v in layer.state_dict().items())


def test_quant_linear_keeps_triton_layout_where_tinygemm_cannot(cpu_fast_path):
    from hf_efficient.quantization import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 40), "int4_asym", 32)  # N = 40 ok, K = 96 ok
    layer(torch.randn(1, 96).half())  # fp16 activations: tinygemm runs bf16 only
    assert layer.layout.kind == "cuda-triton"
    odd = QuantLinear.from_linear(torch.nn.Linear(96, 36), "int4_asym", 32)  # N not a multiple of 8
    odd(torch.randn(1, 96).bfloat16())
    assert odd.layout.kind == "cuda-triton"
    nf = QuantLinear.from_linear(torch.nn.Linear(96, 40), "nf4_asym", 32)
    nf(torch.randn(1, 96).bfloat16())
    assert nf.layout.kind == "cuda-triton"


# --- CUDA --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 32, 32), (24, 96, 32), (4096, 1024, 128), (576, 1536, 64), (40, 256, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_layout_equals_torch_packer(shape):
    n, k, group = shape
    _, codes, _, w = _weight("int4_asym", n, k, group, device="cuda")
    c = codes.cuda()
    packed = (c[:, ::2] << 4 | c[:, 1::2]).contiguous()
    theirs = torch.ops.aten._convert_weight_to_int4pack(packed, T.inner_k_tiles(k))
    assert torch.equal(theirs, w.qweight)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("name,shape", [("int4_asym", (4096, 1024, 128)), ("int4_sym", (576, 1536, 64)),
                                        ("int4_asym", (40, 256, 32)), ("int4_asym", (8, 512, 256))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_matmul_matches_reference(m, name, shape, dtype):
    n, k, group = shape
    _, _, _, w = _weight(name, n, k, group, special="extreme", device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = T.matmul(x, w)
    wr = T.dequantize_reference(w)
    xr = x.to(torch.bfloat16).float() if m <= T.TINYGEMM_MAX_M else x.float()  # tinygemm reads bf16
    ref = xr @ wr.t()
    # output rounding, weights rounded to bf16 inside the kernel (2**-8 of |(q-8) s| + |zf|), fp32 sums
    wmag = (T.unpack(w)[0].float() - 8).abs() * w.sz[..., 0].t().float().repeat_interleave(group, 1) \
        + w.sz[..., 1].t().float().abs().repeat_interleave(group, 1)
    bound = U[dtype] * ref.abs() + ETA[dtype] + (2.0 ** -7 + 1e-5) * (xr.abs() @ wmag.t())
    err = (y.float() - ref).abs()
    assert y.dtype == dtype and y.shape == (m, n)
    assert (err <= bound).all(), f"{(err > bound).sum()} off, max {err.max():.3g}"


@pytest.mark.gpu
def test_gpu_layer_round_trip_and_graph():
    from hf_efficient.quantization import QuantLinear, reference_only
    from hf_efficient.quantization.gpu import prepare_model

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=True)
    layer = QuantLinear.from_linear(lin.cuda(), "int4_asym", 128)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    assert prepare_model(torch.nn.Sequential(layer), torch.bfloat16) == 1
    assert layer.layout.kind == "cuda-tinygemm"
    assert all(torch.equal(v, stored[k]) for k, v in layer.state_dict().items())
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    with reference_only():
        ref = layer(x).float()
    y = layer(x)
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = layer(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    with reference_only():
        ref = layer(x).float()
    assert ((yg.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_from_pretrained_int4_generate_compiled(tmp_path):
    """The user's path: an INT4 AFPQ config loads onto CUDA in bf16 with tinygemm layouts, and generate with a
    static cache compiles the model (the configs are compileable) and matches the reference forward."""
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hf_efficient import AFPQConfig
    from hf_efficient.quantization import QuantLinear, reference_only

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=AFPQConfig(bits=4, group_size=32, fmt="int"))
    kinds = {m.layout.kind for m in model.modules() if isinstance(m, QuantLinear)}
    assert kinds == {"cuda-tinygemm"}, kinds
    ids = torch.randint(0, model.config.vocab_size, (1, 9), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
        assert hasattr(model, "_compiled_call")  # generate took its compiled path
        fast = model(out).logits.float()
        with reference_only():
            ref = model(out).logits.float()
    assert out.shape == (1, 15) and (fast - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("gpu_name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
def test_measured_dispatch_table(monkeypatch, gpu_name):
    """"auto" gives a layer the mma layout only where MEASURED_MMA lists this GPU and the grid's kind, and INT4 at
    bf16 tinygemm's layout first where it applies."""
    from hf_efficient.quantization import QuantLinear, gpu
    from hf_efficient.kernels import quant_mma

    layers = {n: QuantLinear.from_linear(torch.nn.Linear(64, 16), n, 32) for n in ("nf4_asym", "int4_asym",
                                                                                     "fp4_asym")}
    assert not any(gpu._mma_kind(m) for m in layers.values())  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu_name)
    monkeypatch.setattr(quant_mma, "extension", lambda: object())
    gpu._measured.cache_clear()
    try:
        assert all(gpu._mma_kind(m) for m in layers.values())  # every grid kind is measured on both GPUs
        tiny = QuantLinear.from_linear(torch.nn.Linear(256, 16), "int4_asym", 128)
        assert gpu._wanted_layout(tiny, torch.bfloat16) == "cuda-tinygemm"  # INT4 decode: tinygemm first
        assert gpu._wanted_layout(tiny, torch.float16) == "cuda-mma"
        assert gpu._wanted_layout(layers["nf4_asym"], torch.bfloat16) == "cuda-mma"
        with gpu.force_kernel("gemv"):
            assert not gpu._mma_kind(layers["nf4_asym"])
            assert gpu._wanted_layout(tiny, torch.bfloat16) == "cuda-triton"
        with gpu.force_kernel("mma"):
            assert gpu._wanted_layout(tiny, torch.bfloat16) == "cuda-mma"
        # a zero-point grid whose zero points the kernel cannot fold exactly keeps the Triton layout
        odd = QuantLinear.from_linear(torch.nn.Linear(64, 16), "int4_asym", 32)
        object.__setattr__(odd, "fmt", dataclasses.replace(odd.fmt, grid=tuple(c + 0.5 for c in range(16))))
        assert not gpu._mma_kind(odd)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Other GPU")
        gpu._measured.cache_clear()
        assert not gpu._mma_kind(layers["nf4_asym"])  # unmeasured GPU: the Triton layout
    finally:
        gpu._measured.cache_clear()


def test_int4_layout_by_layer_size(monkeypatch):
    """INT4 at bf16: tinygemm's layout up to TINYGEMM_INT4_MAX_WEIGHTS weights on a GPU it lists, the mma layout
    above (where the mma kernel runs the layer); every INT4 layer keeps tinygemm's layout on a GPU it does not list,
    and a forced kernel overrides the size rule."""
    from hf_efficient.kernels import quant_mma
    from hf_efficient.quantization import QuantLinear, gpu

    name = "NVIDIA H100 80GB HBM3"
    assert gpu.TINYGEMM_INT4_MAX_WEIGHTS[name] == 4096 * 4096
    small, large = (QuantLinear.from_linear(torch.nn.Linear(256, n), "int4_asym", 128) for n in (16, 24))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(quant_mma, "extension", lambda: object())
    monkeypatch.setitem(gpu.TINYGEMM_INT4_MAX_WEIGHTS, name, 256 * 16)  # small layers stand for the measured sizes
    gpu._measured.cache_clear()
    try:
        assert gpu._wanted_layout(small, torch.bfloat16) == "cuda-tinygemm"  # at the limit: tinygemm
        assert gpu._wanted_layout(large, torch.bfloat16) == "cuda-mma"  # one row of weights more: mma
        assert gpu._wanted_layout(large, torch.float16) == "cuda-mma"
        with gpu.force_kernel("tinygemm"):
            assert gpu._wanted_layout(large, torch.bfloat16) == "cuda-tinygemm"
        with gpu.force_kernel("gemv"):
            assert gpu._wanted_layout(large, torch.bfloat16) == "cuda-triton"
        monkeypatch.setattr(quant_mma, "extension", lambda: None)  # no mma kernel: tinygemm, whatever the size
        assert gpu._wanted_layout(large, torch.bfloat16) == "cuda-tinygemm"
        monkeypatch.setattr(quant_mma, "extension", lambda: object())
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")  # not listed
        gpu._measured.cache_clear()
        assert gpu._wanted_layout(large, torch.bfloat16) == "cuda-tinygemm"
    finally:
        gpu._measured.cache_clear()
