"""Quantized matmul kernels (dequant GEMV/GEMM, bit-serial LUT GEMM) vs their torch references.

Weights are built from random *integers* (codes, zero points) and random scales, repacked into the
kernel layout, and every kernel is compared with the float32 reference computed from the same integers.

Tolerance (per output element, derived, not fitted): the kernels accumulate in float32 and round once to
the output dtype, so ``|y - ref| <= u_out * |ref| + (u_w + 1e-5) * sum_k |x_k * w_k|`` where ``u_out`` is
the output dtype's unit roundoff (fp16 2**-11, bf16 2**-9; we allow twice that; plus, for results in fp16's
subnormal range, twice its absolute floor 2**-25: a GPU fuzz case with near-cancelling sums met it), ``u_w``
the same for kernels that round the dequantized weight to the activation dtype before ``tl.dot`` (GEMM; 0 for GEMV
and LUT, which multiply in float32), and ``1e-5`` covers float32 summation order over K <= 2**12
(K * 2**-24 ~ 2.4e-4 worst case, ~sqrt(K) * 2**-24 typical; the LUT kernel also sums Walsh terms).
On CPU the kernels run under TRITON_INTERPRET=1 (small shapes). The interpreter cannot ``tl.dot`` bf16
(numpy has no bf16), so bf16 GEMM runs in the GPU tests only; bf16 GEMV/LUT run on CPU too.
"""
from __future__ import annotations


import pytest
import torch

from hf_efficient import formats
from hf_efficient.kernels.quant_layout import DECODE_E2M1, DECODE_INT, DECODE_TABLE, choose_decode, repack, unpack
from hf_efficient.kernels.quant_reference import dequantize_reference, lut_matmul_reference

from hf_efficient.kernels.quant_reference import U, check_close, random_kernel_weight as make_weight  # noqa: E402


# --- layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["int2_asym", "int3_asym", "int4_asym", "int8_asym", "nf3_asym", "fp4_asym"])
def test_repack_roundtrip_and_decode(name):
    fmt, codes, kw = make_weight(name, 5, 100, 32)
    assert torch.equal(unpack(kw), codes)
    assert kw.Kp == 128 and kw.qweight.dtype == torch.int32
    # bytes: 3-bit weights take 3 bits (two planes), not 4
    assert kw.qweight.numel() * 32 == kw.Kp * kw.N * fmt.bits
    ref = formats.decode(fmt, codes, {p: kw.params[i].float().repeat_interleave(32, 1)[:, :100]
                                      for i, p in enumerate(fmt.param_names)})
    torch.testing.assert_close(dequantize_reference(kw), ref, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_and_packing_are_the_same_in_row_blocks(bits, monkeypatch):
    """Packing, unpacking and repacking a block of rows at a time (to bound their temporaries) gives the same
    tensors as one block, including a short last block and blocks of one row."""
    from hf_efficient import blocks
    from hf_efficient.quantization.packing import pack_codes, unpack_codes

    name = {2: "int2_asym", 3: "nf3_asym", 4: "fp4_asym", 8: "int8_asym"}[bits]
    fmt, codes, kw = make_weight(name, 37, 100, 32)
    packed = pack_codes(codes, bits)
    for elements in (1, 3 * 128, 10 * 128):  # one row per block; blocks of 3 and 10 rows (37 = 3 * 12 + 1)
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", elements)
        small = repack(codes, kw.params[0], kw.params[1], fmt.grid, bits, 32, kw.mode)
        assert torch.equal(small.qweight, kw.qweight)
        assert torch.equal(unpack(small), codes)
        assert torch.equal(pack_codes(codes, bits), packed)
        assert torch.equal(unpack_codes(packed, bits, 100), codes)


def test_row_blocks_cover_every_row_once():
    from hf_efficient.blocks import row_blocks

    assert list(row_blocks(7, 10, 30)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(row_blocks(2, 100, 30)) == [slice(0, 1), slice(1, 2)]  # at least one row per block
    assert list(row_blocks(0, 10)) == []


def test_choose_decode():
    assert choose_decode(formats.get_format("int4_asym").grid) == (DECODE_INT, 0.0)
    assert choose_decode(formats.get_format("int3_sym").grid) == (DECODE_INT, -4.0)
    assert choose_decode(formats.get_format("fp4_asym").grid)[0] == DECODE_E2M1
    assert choose_decode(formats.get_format("nf4_asym").grid)[0] == DECODE_TABLE


def test_repack_errors():
    with pytest.raises(ValueError, match="group_size"):
        make_weight("int4_asym", 4, 64, 48)
    fmt = formats.get_format("int4_asym")
    with pytest.raises(ValueError, match="params"):
        repack(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), torch.ones(4, 3), fmt.grid, 4, 32, 1)


# --- kernels under the interpreter ----------------------------------------------------------------
# (format, N, K, group, dtype, special): every format family, all group sizes, K not a multiple of the
# group / block, N not a multiple of BLOCK_N, zero and extreme groups.
CASES = [
    ("int4_asym", 37, 150, 32, torch.float16, None),
    ("int3_asym", 70, 128, 64, torch.bfloat16, "zero"),
    ("int2_asym", 33, 200, 128, torch.float16, "extreme"),
    ("fp4_asym", 64, 96, 32, torch.bfloat16, None),
    ("fp3_asym", 21, 160, 32, torch.float16, "zero"),
    ("nf4_asym", 48, 256, 128, torch.float16, "extreme"),
    ("nf3_asym", 40, 100, 32, torch.bfloat16, "extreme"),
    ("int4_sym", 16, 64, 64, torch.float16, "zero"),
    ("nf4_sym", 9, 130, 64, torch.bfloat16, None),
    ("int8_asym", 24, 96, 32, torch.float16, None),
]


def _ids(c):
    return f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}-{str(c[4])[6:]}-{c[5]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_match_reference(case):
    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv
    from hf_efficient.kernels.quant_lut import MAX_LUT_BITS, quant_lut_gemm

    name, n, k, group, dtype, special = case
    fmt, _, kw = make_weight(name, n, k, group, special=special, seed=n * k)
    torch.manual_seed(k)
    x1 = torch.randn(1, k).to(dtype)
    check_close(quant_gemv(x1, kw), x1, kw, what="gemv")
    xm = torch.randn(5, k).to(dtype)
    check_close(quant_gemv(xm, kw), xm, kw, what="gemv m=5")
    if dtype == torch.float16:
        check_close(quant_gemm(xm, kw), xm, kw, u_w=U[dtype], what="gemm")
    if fmt.bits <= MAX_LUT_BITS:
        check_close(quant_lut_gemm(xm, kw), xm, kw, what="lut", lut=True)


def test_every_config_matches_reference():
    """Each autotune candidate (the CPU run otherwise only meets the first valid one): split-K from 1 to 32,
    so most splits of the wide ones own no K steps and write zero partials the last arriver still sums."""
    from hf_efficient.kernels.autotune import space, valid
    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv

    _, _, kw = make_weight("int4_asym", 20, 700, 32, special="extreme", seed=3)
    torch.manual_seed(0)
    for kernel, fn, m in (("gemv", quant_gemv, 1), ("gemv", quant_gemv, 3), ("gemm", quant_gemm, 17)):
        x = torch.randn(m, 700, dtype=torch.float16)
        args = {"GROUP": 32, "BITS": kw.bits, "M": m, "BLOCK_M": 1 << (m - 1).bit_length()}
        cfgs = [c for c in space(kernel) if valid(kernel, c, args)]
        assert cfgs
        for cfg in cfgs:
            check_close(fn(x, kw, config=cfg), x, kw, u_w=U[x.dtype] if kernel == "gemm" else 0.0,
                        what=f"{kernel} m={m} {cfg}")
    # Long rows: every split owns 2+ K steps, so the prefetching configs really carry a tile across steps.
    for cfg in space("gemv"):
        k = 2 * cfg["SPLIT_K"] * cfg["BLOCK_C"] * 32 + 100
        _, _, kw = make_weight("int4_asym", 20, k, 32, seed=k)
        x = torch.randn(1, k, dtype=torch.float16)
        check_close(quant_gemv(x, kw, config=cfg), x, kw, what=f"gemv k={k} {cfg}")


def test_split_workspace_only_for_small_m():
    from hf_efficient.kernels.autotune import GEMM_SPLIT_MAX_M, max_split

    gemm = lambda m: max_split("gemm", {"M": m, "BITS": 4})  # noqa: E731
    assert gemm(16) > 1 and gemm(GEMM_SPLIT_MAX_M) > 1
    assert gemm(GEMM_SPLIT_MAX_M + 1) == 1 and gemm(4096) == 1  # prefill: no SPLIT_K x M x N fp32 workspace
    assert max_split("gemv", {"M": 1, "BITS": 4, "BLOCK_M": 1}) > 1


@pytest.mark.parametrize("kernel", ["gemv", "gemm", "lut"])
def test_autotuner_runs_only_configs_the_workspace_fits(kernel):
    """The configs ``triton.autotune`` times (``triton.Config`` objects through the prune hook) are exactly the
    valid plain-dict configs, so none has more splits than ``max_split`` sized the workspace for. The hook once
    read ``num_warps`` from ``Config.kwargs`` (where it is not), judged 1- and 2-warp configs as 4-warp ones and
    let a 16-split config write past an 8-split workspace at M = 5: the H200 corruption of docs/gpu_kernels.md."""
    import triton

    from hf_efficient.kernels.autotune import _prune, as_dict, configs, max_split, space, valid

    prune = _prune(kernel)
    for bits in (2, 3, 4, 8):
        for m in (1, 2, 3, 5, 8, 9, 16, 40, 64, 65, 300):
            block_m = triton.next_power_of_2(m)
            if kernel == "gemv" and m > 8:
                continue
            named = {"M": m, "BITS": bits, "GROUP": 128, "N_TERMS": 3}
            extra = {"BLOCK_M": block_m} if kernel == "gemv" else {}
            want = [c for c in space(kernel) if valid(kernel, c, {**named, **extra})]
            if not want:
                with pytest.raises(ValueError, match="no kernel config"):
                    prune(configs(kernel), named, **extra)
                continue
            kept = prune(configs(kernel), named, **extra)
            assert [as_dict(c) for c in kept] == want
            assert max(c.kwargs.get("SPLIT_K", 1) for c in kept) == max_split(kernel, {**named, **extra})


def test_lut_reference_matches_dequant_reference():
    """Both sides are float32 sums of the same products, in different orders and groupings: the LUT form
    sums, per Walsh term t, |beta_t| * |coef| * (a 4-term table of x), so each output's rounding error is
    at most ~(K + T) * 2**-24 times the sum of the magnitudes it adds (twice that, for the two sides)."""
    from hf_efficient.kernels.quant_reference import walsh_terms

    for name in ("int3_asym", "nf4_asym", "fp4_sym"):
        _, _, kw = make_weight(name, 12, 96, 32, special="extreme")
        x = torch.randn(3, 96)
        w = dequantize_reference(kw)
        _, b1, b2 = walsh_terms(kw)
        gi = torch.arange(kw.K) // kw.group_size
        a, b = (p.float()[:, gi].abs() for p in kw.params)
        # the coefficients of f1 and f2 per weight: a (sym), a and a*b (zero point), a and b (two scales)
        coef = {"sym": a, "zero_point": a * b.clamp(min=1), "two_scale": torch.maximum(a, b)}[kw.scheme.name]
        mag = x.abs() @ (coef * float((b1.abs() + b2.abs()).sum())).t() + x.abs() @ w.abs().t()
        bound = 2 * (kw.K + len(b1)) * 2.0 ** -24 * mag
        err = (lut_matmul_reference(x, kw) - x @ w.t()).abs()
        assert (err <= bound).all(), f"{name}: max err {err.max():.3g}, excess {(err - bound).max():.3g}"


def test_kernel_input_errors():
    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv
    from hf_efficient.kernels.quant_lut import quant_lut_gemm

    _, _, kw = make_weight("int4_asym", 8, 64, 32)
    with pytest.raises(ValueError, match="dtype"):
        quant_gemm(torch.randn(2, 64), kw)
    with pytest.raises(ValueError, match="K=64"):
        quant_gemv(torch.randn(1, 65).half(), kw)
    with pytest.raises(ValueError, match="1..8 rows"):
        quant_gemv(torch.randn(9, 64).half(), kw)
    _, _, kw8 = make_weight("int8_asym", 8, 64, 32)
    with pytest.raises(ValueError, match="bits <= 4"):
        quant_lut_gemm(torch.randn(2, 64).half(), kw8)


# --- op, QuantLinear fast path, torch.compile ----------------------------------------------------

@pytest.fixture
def cpu_fast_path():
    """Route QuantLinear on CPU through the op (Triton interpreter), as CUDA does."""
    from hf_efficient.quantization import register_fast_path, unregister_fast_path
    from hf_efficient.quantization.gpu import quant_linear_forward

    for b in (2, 3, 4):
        register_fast_path("*", b, "cpu", quant_linear_forward, name="test-interp")
    yield
    for b in (2, 3, 4):
        unregister_fast_path("*", b, "cpu", "test-interp")


def _qlinear(fmt, k=96, n=40, group=32, bias=True, seed=0):
    from hf_efficient.quantization import QuantLinear

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    return QuantLinear.from_linear(lin, fmt, group)


@pytest.mark.parametrize("fmt,m", [("nf4_asym", 1), ("int3_asym", 3), ("nf3_asym", 2)])
def test_quant_linear_fast_path(cpu_fast_path, fmt, m):
    from hf_efficient.quantization import reference_only
    from hf_efficient.quantization.gpu import force_kernel

    layer = _qlinear(fmt)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(m, 2, 96).half()
    with reference_only():
        ref = layer(x)
    y = layer(x)
    # one resident copy: the kernel layout replaced the stored buffers, and checkpoints still hold the latter
    assert layer.layout.kind == "cuda-triton" and layer.qweight.numel() == 0
    assert all(torch.equal(v, stored[k]) for k, v in layer.state_dict().items())
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
    with force_kernel("lut"):
        torch.testing.assert_close(layer(x), ref, rtol=2e-3, atol=2e-3)
    # new weights go through load_quantized, which drops the layout; the next forward adopts it again
    layer.load_quantized(torch.roll(layer.codes(), 1, 0), {k: v.float() for k, v in layer.params().items()})
    assert layer.layout is None
    with reference_only():
        ref2 = layer(x)
    torch.testing.assert_close(layer(x), ref2, rtol=2e-3, atol=2e-3)


def test_choose_kernel_by_shape():
    from hf_efficient.kernels.quant_gemm import GEMV_MAX_M
    from hf_efficient.quantization import gpu

    assert gpu.GEMV_MAX_M == GEMV_MAX_M
    assert gpu.choose_kernel(1, 4) == "gemv" and gpu.choose_kernel(8, 3) == "gemv" and gpu.choose_kernel(9, 4) == "gemm"
    assert gpu.choose_kernel(16, 4) == "gemm"
    with gpu.force_kernel("lut"):  # the LUT GEMM is an experiment: only ever chosen when forced
        assert gpu.choose_kernel(1, 4) == "lut"
    with pytest.raises(ValueError, match="kernel must be one of"):
        with gpu.force_kernel("fast"):
            pass


def test_op_fake_and_compile(cpu_fast_path):
    from hf_efficient.quantization.gpu import _TRITON_TENSORS, prepare_model, quant_linear_forward

    layer = _qlinear("int4_asym", bias=False)
    x = torch.randn(3, 96).half()
    quant_linear_forward(x, layer)  # adopts the layout
    t = [layer.layout_tensor(n) for n in _TRITON_TENSORS]
    args = (x, *t, 40, 96, *layer.layout.meta, "auto")
    torch.library.opcheck(torch.ops.hf_efficient.quant_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    model = torch.nn.Sequential(_qlinear("nf3_asym", k=96, n=64), torch.nn.GELU(), _qlinear("int4_asym", k=64, n=32))
    assert prepare_model(model) == 0  # nothing on CUDA here
    for m in model.modules():
        if hasattr(m, "qweight"):
            quant_linear_forward(torch.zeros(1, m.in_features).half(), m)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


# --- GPU: fuzz and compile -----------------------------------------------------------------------
# The 1,000-case-per-kernel fuzz is benchmarks/quant_fuzz.py (summary in benchmarks/results/quant_fuzz.md);
# here a shorter run of the same generator on four formats that cover every decode path (uniform-INT mantissa
# trick at 4 and 3 bits, E2M1 two-scale, table two-scale), so a GPU test run still catches a broken kernel
# without compiling every format x dtype x M-bucket variant (~2 s each on the H100).

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "gemv", "gemm", "lut"])
def test_gpu_fuzz(kernel):
    from hf_efficient.kernels.quant_reference import fuzz

    r = fuzz(kernel, cases=100, seed=99, fmt_names=("int4_asym", "int3_asym", "fp4_asym", "nf3_asym"))
    assert r["failed_cases"] == 0, r["failures"]


@pytest.mark.gpu
def test_gpu_every_config():
    from hf_efficient.kernels.autotune import space, valid
    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv
    from hf_efficient.kernels.quant_lut import quant_lut_gemm

    for kernel, fn, m in (("gemv", quant_gemv, 1), ("gemm", quant_gemm, 24), ("lut", quant_lut_gemm, 6)):
        for name in ("nf4_asym", "int4_asym"):
            _, _, kw = make_weight(name, 300, 1000, 128, device="cuda")
            x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
            for cfg in space(kernel):
                if valid(kernel, cfg, {"GROUP": 128, "BITS": kw.bits, "M": m, "BLOCK_M": 1}):
                    check_close(fn(x, kw, config=cfg), x, kw, u_w=U[x.dtype] if kernel == "gemm" else 0.0,
                                what=f"{kernel} {cfg}", lut=kernel == "lut")
    # autotuned entry points too
    _, _, kw = make_weight("fp4_asym", 512, 1024, 128, device="cuda")
    for m in (1, 4, 64):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        y = quant_gemv(x, kw) if m <= 8 else quant_gemm(x, kw)
        check_close(y, x, kw, u_w=U[x.dtype] if m > 8 else 0.0, what=f"tuned m={m}")
        torch.testing.assert_close(y, quant_gemv(x, kw) if m <= 8 else quant_gemm(x, kw), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_layers_after_other_launches():
    """The H200 failure of docs/gpu_kernels.md "Known issues": in this launch sequence (layer calls at M = 5,
    fixed-config split-K GEMVs, an autotuned GEMM) the autotuner once timed a 16-split GEMV against an 8-split
    workspace, corrupting outputs and the next layouts. Every layer's Triton path and layout must match the CPU
    reference whatever ran before it."""
    import copy

    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv
    from hf_efficient.quantization import QuantLinear, reference_only
    from hf_efficient.quantization.gpu import _TRITON_TENSORS, _kernel_weight, force_kernel

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192, bias=True)
    x = torch.randn(5, 576)
    for name in ("int4_asym", "fp4_asym", "nf4_asym"):
        for dtype in (torch.float16, torch.bfloat16):
            cpu = QuantLinear.from_linear(lin, name, 128)
            gpu = QuantLinear.from_linear(copy.deepcopy(lin).cuda(), name, 128)
            with reference_only():
                ref = cpu(x)
            xd = x.cuda().to(dtype)
            with force_kernel("gemv"):  # INT4 at bf16 would otherwise take tinygemm's layout
                torch.testing.assert_close(gpu(xd).float().cpu(), ref, atol=0.05, rtol=0.05)
            kw = _kernel_weight(*[gpu.layout_tensor(n) for n in _TRITON_TENSORS], 192, 576, *gpu.layout.meta)
            assert torch.equal(unpack(kw).cpu(), cpu.codes())
            for split in (1, 2, 8):
                cfg = dict(BLOCK_N=16, BLOCK_C=4, SPLIT_K=split, PREFETCH=0, num_warps=4, num_stages=1)
                check_close(quant_gemv(xd, kw, cfg), xd, kw, what=f"{name} {dtype} split {split}")
            check_close(quant_gemm(xd, kw), xd, kw, u_w=U[dtype], what=f"{name} {dtype} gemm")


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """The split-K arrival counters reset themselves: graph replays on new inputs stay exact."""
    from hf_efficient.kernels.quant_gemm import quant_gemm, quant_gemv

    _, _, kw = make_weight("int4_asym", 1000, 2048, 64, device="cuda")
    for fn, m in ((quant_gemv, 1), (quant_gemv, 5), (quant_gemm, 40)):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        fn(x, kw)  # autotune outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = fn(x, kw)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            g.replay()
            check_close(y, x, kw, u_w=U[x.dtype] if fn is quant_gemm else 0.0, what=f"graph m={m}")


@pytest.mark.gpu
def test_gpu_quant_model_generate_compiled():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_efficient.quantization import QuantLinear, reference_only
    from hf_efficient.quantization.gpu import prepare_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                setattr(mod, cname, QuantLinear.from_linear(child, "nf4_asym", 64))
    model = model.to("cuda", torch.bfloat16)
    assert prepare_model(model) == 14
    ids = torch.randint(0, 512, (1, 12), device="cuda")
    with torch.no_grad():
        with reference_only():
            ref = model(ids).logits.float()
        fast = model(ids).logits.float()
        model.forward = torch.compile(model.forward, fullgraph=False)
        comp = model(ids).logits.float()
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    for y in (fast, comp):
        assert (y - ref).norm() / ref.norm() < 2e-2
    assert out.shape == (1, 20)
