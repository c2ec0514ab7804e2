"""C++ LUT kernels (csrc/lut_gemm.cpp, engines in csrc/lut/) against their plain-torch twin
(hf_efficient/kernels/lut_cpu_reference.py); every engine this CPU runs against the scalar one, bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_efficient import formats
from hf_efficient.kernels import lut_cpu as K
from hf_efficient.kernels import lut_cpu_reference as R
from hf_efficient.quantization.linear import rtn_quantize
from hf_efficient.quantization.packing import expand_groups

# (bits, engine): "int" = bit-serial, "grid1"/"grid2" = code-indexed with 1 or 2 channels.
ENGINES = [(2, "int"), (3, "int"), (4, "int"), (1, "grid1"), (2, "grid1"), (3, "grid1"), (4, "grid1"),
           (1, "grid2"), (2, "grid2"), (3, "grid2"), (4, "grid2")]
# (M, N, K, group): K not a multiple of 16 or of the group, odd N, a short last group, N < one tile.
SHAPES = [(1, 37, 200, 32), (3, 16, 576, 128), (2, 33, 136, 64), (1, 5, 48, 16), (5, 50, 260, 128)]


def _spec(bits, engine, n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=g)
    ng = (R.padded_k(k) + group - 1) // group
    grid = None if engine == "int" else torch.randn(int(engine[-1]), 2 ** bits, generator=g)
    ch = 1 if grid is None else grid.shape[0]
    coef = torch.randn(n, ng, ch, generator=g)
    zcoef = torch.randn(n, ng, generator=g)
    return codes, grid, coef, zcoef


ISAS = K.available_isas() if K.available() else ["scalar"]


def _on(monkeypatch, isa):
    monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", isa)


def _x(m, k, seed=1, outliers=False):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    if outliers:
        x[:, ::37] *= 100.0
    return x


@pytest.mark.parametrize("bits,engine", ENGINES)
@pytest.mark.parametrize("m,n,k,group", SHAPES[:3])
def test_tables_bit_exact(bits, engine, m, n, k, group, monkeypatch):
    _, grid, _, _ = _spec(bits, engine, n, k, group)
    x = _x(m, k, outliers=True)
    rtab, rts, rgs = R.lut_tables(x, grid, bits, group)
    for isa in ISAS:
        _on(monkeypatch, isa)
        tab, ts, gs = K.ops().lut_tables(x, grid, bits, group)
        assert torch.equal(tab, rtab)
        assert torch.equal(ts, rts)
        torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,engine", ENGINES)
@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("outliers", [False, True])
def test_gemm_matches_reference_every_engine(bits, engine, m, n, k, group, outliers, monkeypatch):
    codes, grid, coef, zcoef = _spec(bits, engine, n, k, group)
    w = K.prepare_spec(codes, bits, group, grid, coef, zcoef)
    x = _x(m, k, outliers=outliers)
    _, _, coef_eff, zcoef_eff = K.stored_coefs(coef, zcoef)  # the fp16 coefficients the kernel stores
    ref = R.lut_gemm(x, codes, coef_eff, zcoef_eff, grid, bits, group)
    ys = w.matmul(x, force_scalar=True)
    tol = 1e-5 * float(ref.abs().max()) + 1e-5
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=tol)
    for isa in ISAS[1:]:
        _on(monkeypatch, isa)
        # Same integer sums and the same fma epilogue: every SIMD engine agrees with the scalar one bit for bit.
        assert torch.equal(w.matmul(x), ys), isa


def _dequant_reference(codes, grid, coef, zcoef, bits, group):
    """The weights the stream holds, computed as the kernels do (bit-serial: coef * (2c - (2^b - 1) + zmul))."""
    _, z16, ce, _ = K.stored_coefs(coef, zcoef)
    n, k = codes.shape
    cols = lambda t: expand_groups(t, R.padded_k(k), group)[:, :k]  # noqa: E731
    if grid is None:
        return cols(ce[..., 0]) * ((2 * codes.float() - (2 ** bits - 1)) + cols(z16.float()))
    w = cols(ce[..., 0]) * grid[0][codes.long()]
    for ch in range(1, grid.shape[0]):
        w = w + cols(ce[..., ch]) * grid[ch][codes.long()]
    return w


@pytest.mark.parametrize("bits,engine", ENGINES)
@pytest.mark.parametrize("n,k,group", [(37, 200, 32), (50, 260, 128), (70, 576, 64)])
def test_codes_and_dequant_invert_the_packing(bits, engine, n, k, group, monkeypatch):
    codes, grid, coef, zcoef = _spec(bits, engine, n, k, group)
    w = K.prepare_spec(codes, bits, group, grid, coef, zcoef)
    assert torch.equal(w.codes(), codes)
    ref = _dequant_reference(codes, grid, coef, zcoef, bits, group)
    for isa in ISAS:
        _on(monkeypatch, isa)
        assert torch.equal(w.dequantize(), ref), isa


@pytest.mark.parametrize("bits,engine", [(4, "int"), (2, "int"), (3, "int"), (4, "grid2"), (3, "grid1")])
@pytest.mark.parametrize("m", [33, 100])
def test_prefill_path_is_blas_on_dequantized_blocks(bits, engine, m, monkeypatch):
    """Above max_lut_rows() the op dequantizes row blocks and runs the float GEMM: equal to F.linear with the
    dequantized weight up to float32 summation order (bounded by K ulps of sum |x||w|)."""
    n, k, group = 1400, 200, 32  # more rows than one dequantized block (640), and a partial last tile
    codes, grid, coef, zcoef = _spec(bits, engine, n, k, group)
    w = K.prepare_spec(codes, bits, group, grid, coef, zcoef)
    x = _x(m, k)
    wd = _dequant_reference(codes, grid, coef, zcoef, bits, group)
    ref = F.linear(x, wd)
    bound = k * torch.finfo(torch.float32).eps * (x.abs() @ wd.abs().T)
    for isa in ISAS:
        _on(monkeypatch, isa)
        y = w.matmul(x)
        assert ((y - ref).abs() <= bound).all(), isa
    monkeypatch.setenv("HF_EFFICIENT_LUT_MAX_ROWS", str(m))  # the same input on the table engine instead
    _, _, ce, ze = K.stored_coefs(coef, zcoef)
    lref = R.lut_gemm(x, codes[:40], ce[:40], ze[:40], grid, bits, group)  # rows are independent
    torch.testing.assert_close(w.matmul(x)[:, :40], lref, rtol=1e-5, atol=1e-5 * float(lref.abs().max()) + 1e-5)


def test_env_var_forces_scalar(monkeypatch):
    assert K.isa(force_scalar=True) == "scalar"
    monkeypatch.setenv("HF_EFFICIENT_LUT_SCALAR", "1")
    assert K.isa() == "scalar"
    monkeypatch.setenv("HF_EFFICIENT_LUT_SCALAR", "0")
    cap = torch.backends.cpu.get_cpu_capability()  # torch's own cpuid reading
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, K.isa())
    assert K.isa() == expected
    assert K.available_isas()[-1] == expected and K.available_isas()[0] == "scalar"
    monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", "scalar")
    assert K.isa() == "scalar"
    monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", "sse9")
    with pytest.raises(RuntimeError, match="HF_EFFICIENT_LUT_ISA must be"):
        K.isa()


def test_threads_do_not_change_results():
    codes, grid, coef, zcoef = _spec(2, "int", 130, 512, 64)
    w = K.prepare_spec(codes, 2, 64, grid, coef, zcoef)
    x = _x(4, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = w.matmul(x)
        torch.set_num_threads(2)
        y2 = w.matmul(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_zero_activations_give_exact_zero():
    for bits, engine in [(2, "int"), (4, "grid2")]:
        codes, grid, coef, zcoef = _spec(bits, engine, 20, 100, 32)
        w = K.prepare_spec(codes, bits, 32, grid, coef, zcoef)
        x = _x(3, 100)
        x[1] = 0.0
        y = w.matmul(x)
        assert torch.equal(y[1], torch.zeros(20))


FORMAT_NAMES = ["int2_asym", "int3_asym", "int4_asym", "int2_sym", "int4_sym", "fp4_sym", "fp4_asym", "fp3_asym",
                "nf4_sym", "nf4_asym", "nf3_asym"]


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_formats_within_table_quantization_bound(name, group):
    """Against the exact float product with the decoded weight: the only error is int8 table rounding,
    bounded by half a step per lookup (reference.error_bound); the bound itself must be small."""
    fmt = formats.get_format(name)
    n, k = 24, 328
    g = torch.Generator().manual_seed(3)
    wf = torch.randn(n, k, generator=g)
    codes, params = rtn_quantize(wf, fmt, group, torch.float16)
    lw = K.prepare(codes, fmt, params, group)
    cols = {p: expand_groups(t, k, group) for p, t in params.items()}
    wq = formats.decode(fmt, codes, cols)
    for outliers in (False, True):
        x = _x(3, k, seed=4, outliers=outliers)
        exact = F.linear(x.double(), wq.double())
        y = lw.matmul(x).double()
        _, coef, zc = K.kernel_params(fmt, params)
        if lw.grid is not None:  # code-indexed tables: one scale per 32 activations
            coef, _, kg = K.split_groups(coef, zc, group, k, K.TABLE_GROUP)
        else:
            kg = group
        assert kg == lw.group_size
        _, ts, _ = R.lut_tables(x, lw.grid, fmt.bits, kg)
        bound = R.error_bound(coef, ts, fmt.bits, kg, k, lw.grid is not None)
        err = (y - exact).abs()
        assert (err <= bound * 1.001 + 1e-4).all(), float((err - bound).max())
        # int8 tables keep the product accurate (the 4-bit weights' own error is ~10 %); activation
        # outliers (x100) widen the group's table step.
        assert float(err.norm() / exact.norm()) < (0.05 if outliers else 0.02)


def test_per_channel_group_and_padding():
    fmt = formats.get_format("int4_asym")
    wf = torch.randn(9, 100)
    codes, params = rtn_quantize(wf, fmt, 100, torch.float32)
    lw = K.prepare(codes, fmt, params, 100)  # one group of 100 -> kernel group 112 over the zero padding
    assert lw.group_size == 112
    x = _x(2, 100)
    wq = formats.decode(fmt, codes, {p: expand_groups(t, 100, 100) for p, t in params.items()})
    exact = x @ wq.T
    assert float((lw.matmul(x) - exact).norm() / exact.norm()) < 0.02


def test_matmul_keeps_leading_dims():
    codes, grid, coef, zcoef = _spec(2, "grid1", 17, 64, 32)
    w = K.prepare_spec(codes, 2, 32, grid, coef, zcoef)
    x = torch.randn(2, 3, 64)
    assert torch.equal(w.matmul(x), w.matmul(x.reshape(6, 64)).view(2, 3, 17))


def test_bad_inputs_raise_clear_errors():
    codes, grid, coef, zcoef = _spec(2, "int", 16, 64, 32)
    w = K.prepare_spec(codes, 2, 32, grid, coef, zcoef)
    op = K.ops().lut_gemm
    with pytest.raises(ValueError, match="x has 63 features"):
        w.matmul(torch.randn(1, 63))
    with pytest.raises(RuntimeError, match="qweight has .* bytes"):
        op(torch.randn(1, 96), w.qweight, None, 2, 32, 16)
    with pytest.raises(RuntimeError, match="qweight has .* bytes"):  # packed for another group size
        op(torch.randn(1, 64), w.qweight, None, 2, 16, 16)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 16"):
        op(torch.randn(1, 64), w.qweight, None, 2, 24, 16)
    with pytest.raises(RuntimeError, match="bits must be 1, 2, 3 or 4"):
        op(torch.randn(1, 64), w.qweight, None, 5, 32, 16)
    with pytest.raises(RuntimeError, match="bit-serial engine needs bits >= 2"):
        op(torch.randn(1, 64), w.qweight, None, 1, 32, 16)
    with pytest.raises(RuntimeError, match="x must be float32"):
        op(torch.randn(1, 64, dtype=torch.float64), w.qweight, None, 2, 32, 16)
    with pytest.raises(RuntimeError, match="grid must be float32"):
        op(torch.randn(1, 64), w.qweight, torch.randn(1, 8), 2, 32, 16)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 16"):
        K.prepare_spec(codes, 2, 24, grid, coef, zcoef)
    with pytest.raises(ValueError, match="1-bit weights need a grid"):
        K.prepare_spec(codes.clamp(max=1), 1, 32, None, coef, zcoef)
    with pytest.raises(ValueError, match="coef must be"):
        K.prepare_spec(codes, 2, 32, grid, coef[:, :1], zcoef)
    with pytest.raises(ValueError, match="channels"):
        K.prepare_spec(codes, 2, 32, torch.randn(2, 4), coef, zcoef)
    with pytest.raises(ValueError, match="fit in float16"):
        K.prepare_spec(codes, 2, 32, grid, coef * 1e6, zcoef)
    with pytest.raises(ValueError, match="zcoef must be 0 where coef"):
        K.prepare_spec(codes, 2, 32, grid, torch.zeros_like(coef), zcoef)
    with pytest.raises(ValueError, match="1..4 bits"):
        K.kernel_params(formats.get_format("int8_asym"), {})


def test_stored_coefs_keep_int_zero_points_exact():
    """INT formats: coef = s / 2 with fp16 scales and zcoef = s * (integer / 2) survive fp16 storage exactly."""
    fmt = formats.get_format("int4_asym")
    codes, params = rtn_quantize(torch.randn(40, 256), fmt, 64, torch.float16)
    _, coef, zcoef = K.kernel_params(fmt, params)
    _, _, ce, ze = K.stored_coefs(coef, zcoef)
    assert torch.equal(ce, coef) and torch.equal(ze, zcoef)


def test_opcheck_fake_impls():
    codes, grid, coef, zcoef = _spec(3, "grid2", 20, 80, 32)
    w = K.prepare_spec(codes, 3, 32, grid, coef, zcoef)
    x = torch.randn(2, 80)
    torch.library.opcheck(torch.ops.hf_efficient.lut_gemm.default,
                          (x, w.qweight, w.grid, 3, 32, 20, False))
    torch.library.opcheck(torch.ops.hf_efficient.lut_tables.default, (x, w.grid, 3, 32))
    torch.library.opcheck(torch.ops.hf_efficient.lut_dequant.default, (w.qweight, w.grid, 3, 32, 80, 20))
    torch.library.opcheck(torch.ops.hf_efficient.lut_codes.default, (w.qweight, 3, 32, 80, 20, True))
    torch.library.opcheck(torch.ops.hf_efficient.lut_gemm.default,  # the prefill (dequantize + GEMM) path
                          (torch.randn(40, 80), w.qweight, w.grid, 3, 32, 20, False))


@pytest.mark.parametrize("bits,engine", [(4, "int"), (3, "int"), (2, "int"), (4, "grid2"), (2, "grid1")])
def test_int16_headroom_long_groups(bits, engine, monkeypatch):
    """Every lookup at +127 (equal positive activations, all-ones codes) over groups longer than the int16
    chunk: the accumulators must widen to int32 in time in both engines."""
    n, k, group = 40, 2048, 2048
    codes, grid, coef, zcoef = _spec(bits, engine, n, k, group)
    codes = torch.full_like(codes, 2 ** bits - 1)
    if grid is not None:
        grid = grid.abs() + 1.0
        grid[:, -1] = grid.max() + 1.0  # the looked-up entry is the table's largest: int8 +127
    w = K.prepare_spec(codes, bits, group, grid, coef, zcoef)
    x = torch.ones(2, k)
    _, _, ce, ze = K.stored_coefs(coef, zcoef)
    ref = R.lut_gemm(x, codes, ce, ze, grid, bits, group)
    ys = w.matmul(x, force_scalar=True)
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    for isa in ISAS[1:]:
        monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", isa)
        assert torch.equal(w.matmul(x), ys), isa


@pytest.mark.parametrize("bits,engine", ENGINES)
def test_one_row_split_build_equals_whole_rows(bits, engine, monkeypatch):
    """A one-row lut_gemm builds its tables in parts (weight groups) on all threads, then runs the tiles in the
    same parallel region: at 1, 2 and 3 threads it equals row 0 of a two-row call (whole-row builds, one per row)
    bit for bit; K 520 with group 64 leaves a short last group."""
    n, k, group = 70, 520, 64
    codes, grid, coef, zcoef = _spec(bits, engine, n, k, group)
    w = K.prepare_spec(codes, bits, group, grid, coef, zcoef)
    x2 = _x(2, k, outliers=True)
    old = torch.get_num_threads()
    try:
        for isa in ISAS:
            _on(monkeypatch, isa)
            torch.set_num_threads(1)
            want = w.matmul(x2)[:1]
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                assert torch.equal(w.matmul(x2[:1]), want), (isa, threads)
    finally:
        torch.set_num_threads(old)
