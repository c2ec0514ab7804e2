"""Scale schemes as data: the registry is the one place that names a scheme's parameters, dtypes, mode and rule."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from hf_efficient import formats, schemes
from hf_efficient.schemes import SCHEMES, Param, Scheme

ROOT = Path(__file__).resolve().parents[1]


def test_registry_rows():
    assert {n: (s.param_names, s.mode) for n, s in SCHEMES.items()} == {
        "sym": (("scales",), 0),
        "zero_point": (("scales", "zeros"), 1),
        "two_scale": (("scales_pos", "scales_neg"), 2),
    }
    assert [p.name for s in SCHEMES.values() for p in s.params if p.integer] == ["zeros"]
    for s in SCHEMES.values():
        assert schemes.scheme_of_mode(s.mode) is s
        for p in s.params:
            assert p.storage_dtype(torch.bfloat16) == (torch.uint8 if p.integer else torch.bfloat16)
    for fmt in formats.FORMATS.values():
        assert fmt.scale_scheme is SCHEMES[fmt.scheme]
        assert fmt.param_names == fmt.scale_scheme.param_names


def test_bad_rows_and_lookups():
    with pytest.raises(ValueError, match="one or two parameters"):
        Scheme("three", (Param("a"), Param("b"), Param("c")), mode=7)
    with pytest.raises(ValueError, match="second parameter"):
        Scheme("lonely", (Param("a"),), mode=7, offset=True)
    with pytest.raises(ValueError, match="not both"):
        Scheme("both", (Param("a"), Param("b")), mode=7, offset=True, split_sign=True)
    with pytest.raises(ValueError, match=r"mode must be one of \(0, 1, 2\)"):
        schemes.scheme_of_mode(3)
    with pytest.raises(ValueError, match="unknown scale scheme"):
        schemes.get_scheme("log")
    with pytest.raises(KeyError, match="has no parameter"):
        SCHEMES["sym"].param("zeros")


def test_kernel_modes_match_the_compiled_kernels():
    """The CUDA kernel and the Triton kernels compile one branch per mode: their constants are the registry's."""
    src = (ROOT / "hf_efficient" / "kernels" / "cuda" / "quant_mma_args.h").read_text()
    cuda = dict(re.findall(r"(MODE_\w+) = (\d+)", re.search(r"constexpr int MODE_SYM[^;]*;", src).group(0)))
    assert {k: int(v) for k, v in cuda.items()} == {"MODE_SYM": SCHEMES["sym"].mode,
                                                     "MODE_ZERO": SCHEMES["zero_point"].mode,
                                                     "MODE_TWO": SCHEMES["two_scale"].mode}
    pytest.importorskip("triton")
    from hf_efficient.kernels import quant_gemm

    assert (quant_gemm.SYM.value, quant_gemm.ZERO_POINT.value, quant_gemm.TWO_SCALE.value) == (
        SCHEMES["sym"].mode, SCHEMES["zero_point"].mode, SCHEMES["two_scale"].mode)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_rule_and_its_split(name):
    """``apply`` is the rule; ``a f1 + second_coef f2`` (the LUT formulations) equals it in exact arithmetic."""
    s = SCHEMES[name]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g, dtype=torch.float64)
    a = torch.rand(64, generator=g, dtype=torch.float64)
    b = torch.randint(0, 16, (64,), generator=g).double() if s.offset else torch.rand(64, generator=g).double()
    want = {"sym": v * a, "zero_point": (v - b) * a, "two_scale": torch.where(v < 0, v * b, v * a)}[name]
    assert torch.equal(s.apply(v, a, b), want)
    f1, f2 = s.value_split(v)
    torch.testing.assert_close(a * f1 + s.second_coef(a, b) * f2, want, rtol=1e-14, atol=1e-14)
    assert s.from_kernel(*s.kernel_ab(s.from_kernel(a, b))).keys() == set(s.param_names)


def _code_constants(path: Path) -> set[str]:
    """String literals of a module's code (docstrings excluded)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.add(n.value)
        elif isinstance(n, ast.JoinedStr):  # f-strings: their literal parts
            out |= {v.value for v in n.values if isinstance(v, ast.Constant)}
    return out


@pytest.mark.parametrize("path", ["hf_efficient/quantization/linear.py", "hf_efficient/quantization/gpu.py",
                                  "hf_efficient/quantization/packing.py", "hf_efficient/checkpoint.py",
                                  "hf_efficient/kernels/quant_layout.py", "hf_efficient/kernels/quant_reference.py",
                                  "hf_efficient/kernels/quant_mma.py", "hf_efficient/kernels/lut_cpu.py"])
def test_code_paths_name_no_scheme(path):
    """Layers, packing, checkpoints and kernel glue read the registry; they spell no scheme or parameter name."""
    names = set(SCHEMES) | {p for s in SCHEMES.values() for p in s.param_names}
    assert not names & _code_constants(ROOT / path)


def test_a_new_scheme_is_one_row(monkeypatch):
    """Replace the zero-point row by one with other parameter names: layers, storage, kernel layouts and the
    CPU LUT glue follow the row (nothing else names the parameters)."""
    from hf_efficient.kernels.lut_cpu import kernel_params
    from hf_efficient.kernels.quant_layout import repack
    from hf_efficient.kernels.quant_reference import dequantize_reference
    from hf_efficient.quantization.linear import QuantLinear

    old = SCHEMES["zero_point"]
    row = dataclasses.replace(old, name="zero_point", params=(Param("step"), Param("origin", integer=True)))
    monkeypatch.setitem(SCHEMES, "zero_point", row)
    monkeypatch.setitem(schemes._BY_MODE, row.mode, row)
    fmt = formats.get_format("int4_asym")
    assert fmt.param_names == ("step", "origin")

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, fmt, 32)
    assert {n for n, _ in q.named_buffers()} == {"qweight", "step", "origin"}
    assert q.origin.dtype == torch.uint8 and q.step.dtype == torch.float16
    w = q.dequantize()
    assert (w - lin.weight).abs().max() <= q.step.float().max() / 2 + 1e-6

    a, b = row.kernel_ab(q.params())
    kw = repack(q.codes(), a, b.to(a.dtype), fmt.grid, fmt.bits, 32, fmt.scale_scheme.mode)
    assert torch.equal(dequantize_reference(kw), w)
    grid, coef, zcoef = kernel_params(fmt, q.params())
    assert grid is None and coef.shape == (8, 2, 1) and zcoef.shape == (8, 2)
