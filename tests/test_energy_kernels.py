"""The energy tuner's GEMV/GEMM variants against the fp32 reference (Triton interpreter on the CPU).

Under the interpreter ``tl.dot`` mishandles bfloat16 (numpy has none), so tensor-core variants are checked in
float16 here and in bfloat16 on the GPU (tests/test_energy_gpu.py runs them through the dispatcher)."""
from __future__ import annotations

import pytest
import torch

from hf_efficient.kernels import energy_gemv as eg

# name, impl, dtype, (M, N, K), launch config: ragged N and K (masks), several rows, M = 16 for tl.dot
CASES = [
    ("acc1d ragged", "acc1d", torch.bfloat16, (1, 40, 100), dict(BLOCK_N=16, BLOCK_K=32)),
    ("acc1d rows", "acc1d", torch.float16, (3, 33, 64), dict(BLOCK_N=8, BLOCK_K=64)),
    ("acc2d ragged", "acc2d", torch.bfloat16, (1, 40, 100), dict(BLOCK_N=16, BLOCK_K=32)),
    ("acc2d fp32", "acc2d", torch.float32, (2, 17, 50), dict(BLOCK_N=16, BLOCK_K=16)),
    ("dot ragged", "dot", torch.float16, (1, 50, 70), dict(BLOCK_N=32, BLOCK_K=32)),
    ("dot 16 rows", "dot", torch.float16, (16, 64, 64), dict(BLOCK_N=16, BLOCK_K=32)),
]


def _bound(x, w, out_dtype):
    # fp32 accumulation over K terms (order differs from the reference) + one rounding to the output dtype
    k = x.shape[1]
    mag = x.float().abs() @ w.float().abs().T
    return mag * k * 2.0 ** -23 + (x.float() @ w.float().T).abs() * torch.finfo(out_dtype).eps + 1e-6


@pytest.mark.parametrize("name,impl,dtype,shape,cfg", CASES, ids=[c[0] for c in CASES])
def test_gemv_variants_match_reference(name, impl, dtype, shape, cfg):
    m, n, k = shape
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    y = eg.gemv(x, w, impl, **cfg)
    ref = x.float() @ w.float().T
    assert y.dtype == dtype and y.shape == (m, n)
    assert ((y.float() - ref).abs() <= _bound(x, w, dtype)).all()


def test_gemm_matches_reference():
    x, w = torch.randn(20, 50, dtype=torch.float16), torch.randn(40, 50, dtype=torch.float16)
    y = eg.gemm(x, w, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    assert ((y.float() - x.float() @ w.float().T).abs() <= _bound(x, w, torch.float16)).all()


def test_empty_dimensions():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert eg.gemv(torch.randn(0, 16, dtype=torch.bfloat16), w).shape == (0, 8)
    z = eg.gemv(torch.randn(2, 0, dtype=torch.bfloat16), torch.randn(8, 0, dtype=torch.bfloat16))
    assert z.shape == (2, 8) and not z.any()
    assert eg.gemm(torch.randn(0, 16, dtype=torch.float16), w.half()).shape == (0, 8)


ERRORS = [
    ("impl", lambda: eg.gemv(torch.randn(1, 8), torch.randn(4, 8), impl="tiles")),
    ("K=", lambda: eg.gemv(torch.randn(1, 8), torch.randn(4, 9))),
    ("dtype", lambda: eg.gemv(torch.randn(1, 8), torch.randn(4, 8).half())),
    ("BLOCK_N", lambda: eg.gemv(torch.randn(1, 8), torch.randn(4, 8), BLOCK_N=12)),
    ("M <= 16", lambda: eg.gemv(torch.randn(17, 32).half(), torch.randn(4, 32).half(), "dot", 16, 16)),
    ("BLOCK_M", lambda: eg.gemm(torch.randn(1, 8), torch.randn(4, 8), BLOCK_M=8)),
    ("GROUP_M", lambda: eg.gemm(torch.randn(1, 8), torch.randn(4, 8), GROUP_M=0)),
]


@pytest.mark.parametrize("field,call", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_arguments_raise(field, call):
    with pytest.raises(ValueError, match=field):
        call()


def test_every_registered_candidate_runs_and_matches():
    """Each candidate the tuner may pick computes the same product (small shape, fp16 for the interpreter)."""
    from hf_efficient.energy import get_op

    x, w = torch.randn(1, 96, dtype=torch.float16), torch.randn(40, 96, dtype=torch.float16)
    bound = _bound(x, w, torch.float16)
    spec = get_op("bf16_gemv")
    seen = set()
    for c in spec.candidates(1, 40, 96):
        sig = (c.impl, c.kwargs.get("BLOCK_N"), c.kwargs.get("BLOCK_K"))  # warps/stages do not change results
        if sig in seen:
            continue
        seen.add(sig)
        y = spec.run(c, x, w)
        assert ((y.float() - x.float() @ w.float().T).abs() <= bound).all(), c.key
