"""SeerAttention kernels vs their plain-torch twins (interpreter on CPU, real GPU under -m gpu)."""
from __future__ import annotations

import math

import pytest
import torch

from hf_efficient.kernels import seer_reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Hkv, Sq, Sk, D, block): ragged lengths, GQA ratios 1/2/4, prefill-after-cache (Sq < Sk)
SHAPES = [
    (1, 4, 2, 100, 100, 32, 16),
    (2, 4, 1, 77, 130, 64, 32),
    (1, 2, 2, 64, 64, 16, 16),
    (1, 8, 2, 150, 150, 32, 64),
]


def _qkv(b, h, hkv, sq, sk, d, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return mk(b, h, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, d)


def _mask(b, h, sq, sk, blk, density, seed=0, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(seed)
    nqb, nkb = math.ceil(sq / blk), math.ceil(sk / blk)
    m = (torch.rand(b, h, nqb, nkb, generator=g) < density).to(device)
    return m & R.causal_block_mask(sq, sk, blk, device)


def _diag_only(b, h, sq, sk, blk, device=DEV):
    """Nearly empty: only the block holding each query block's last visible key."""
    nqb, nkb = math.ceil(sq / blk), math.ceil(sk / blk)
    m = torch.zeros(b, h, nqb, nkb, dtype=torch.bool, device=device)
    last = ((torch.arange(nqb) * blk + blk - 1).clamp(max=sq - 1) + sk - sq) // blk
    m[:, :, torch.arange(nqb), last.clamp(max=nkb - 1)] = True
    return m


def _tol(dtype):
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def test_index_roundtrip():
    m = _mask(2, 3, 200, 200, 16, 0.4, device="cpu")
    idx, cnt = R.block_mask_to_indices(m)
    assert torch.equal(R.indices_to_block_mask(idx, cnt, m.shape[-1]), m)
    for row, c in zip(idx.view(-1, idx.shape[-1]), cnt.view(-1)):
        assert torch.all(row[: int(c)].diff() > 0)  # ascending, as the kernel requires


def test_reference_all_dense_equals_plain_attention():
    q, k, v = _qkv(1, 4, 2, 70, 70, 16, device="cpu")
    full = R.causal_block_mask(70, 70, 16)[None, None].expand(1, 4, -1, -1)
    out = R.attention_reference(q, k, v, block_mask=full, block=16)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def _run_sparse(shape, density, dtype, pair):
    from hf_efficient.kernels import seer_attention as K

    b, h, hkv, sq, sk, d, blk = shape
    q, k, v = _qkv(b, h, hkv, sq, sk, d, dtype)
    m = _diag_only(b, h, sq, sk, blk) if density == "diag" else _mask(b, h, sq, sk, blk, density)
    idx, cnt = R.block_mask_to_indices(m)
    out = K.sparse_attention(q, k, v, idx, cnt, block=blk, pair=pair)
    ref = R.sparse_attention_reference(q, k, v, idx, cnt, block=blk)
    assert out.shape == ref.shape and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,pair", [(1.0, 1), (0.5, 2), ("diag", 2)])
def test_sparse_kernel_matches_reference(shape, density, pair):
    _run_sparse(shape, density, torch.float32, pair)


def test_sparse_kernel_strided_hf_layout():
    """transformers hands q/k/v as transposed views of (B, S, H, D) projections."""
    from hf_efficient.kernels import seer_attention as K

    q = torch.randn(1, 90, 4, 32, device=DEV).transpose(1, 2)
    k = torch.randn(1, 90, 2, 32, device=DEV).transpose(1, 2)
    v = torch.randn(1, 90, 2, 32, device=DEV).transpose(1, 2)
    idx, cnt = R.block_mask_to_indices(_mask(1, 4, 90, 90, 16, 0.6))
    torch.testing.assert_close(K.sparse_attention(q, k, v, idx, cnt, block=16),
                               R.sparse_attention_reference(q, k, v, idx, cnt, block=16), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_pooled_kernel_matches_dense(shape):
    from hf_efficient.kernels import seer_attention as K

    b, h, hkv, sq, sk, d, blk = shape
    q, k, v = _qkv(b, h, hkv, sq, sk, d)
    out, pooled = K.pooled_attention(q, k, v, block=blk)
    rout, rpooled = R.pooled_attention_reference(q, k, v, block=blk)
    torch.testing.assert_close(out, rout, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pooled, rpooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled.sum(-1), torch.ones_like(pooled.sum(-1)))


def test_kernel_bad_input():
    from hf_efficient.kernels import seer_attention as K

    q, k, v = _qkv(1, 3, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="heads"):
        K.pooled_attention(q, k, v, block=16)
    q, k, v = _qkv(1, 2, 2, 32, 32, 24)
    with pytest.raises(ValueError, match="head_dim"):
        K.pooled_attention(q, k, v, block=16)
    q, k, v = _qkv(1, 2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="kv_idx"):
        K.sparse_attention(q, k, v, torch.zeros(1, 2, 5, 2, dtype=torch.int32), torch.ones(1, 2, 5, dtype=torch.int32),
                           block=16)


def test_custom_ops_fake_and_cpu():
    from hf_efficient.attention.seer import ops  # noqa: F401

    q, k, v = _qkv(1, 4, 2, 40, 40, 16, device="cpu")
    idx, cnt = R.block_mask_to_indices(_mask(1, 4, 40, 40, 16, 0.5, device="cpu"))
    torch.library.opcheck(torch.ops.hf_efficient.seer_sparse_attention, (q, k, v, idx, cnt, True, 0.25, 16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.hf_efficient.seer_pooled_attention, (q, k, v, True, 0.25, 16),
                          test_utils=("test_schema", "test_faketensor"))


# ---- GPU: the compiled kernels on random shapes and fp16/bf16 ----------------------------------------------
GPU_SHAPES = [SHAPES[1], SHAPES[3], (1, 32, 8, 1000, 1000, 128, 64), (2, 8, 8, 333, 333, 64, 64),
              (1, 16, 4, 2049, 2049, 128, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density,pair", [(1.0, 2), (0.3, 1), ("diag", 2)])
def test_gpu_sparse_kernel(shape, dtype, density, pair):
    _run_sparse(shape, density, dtype, pair)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_pooled_kernel(shape, dtype):
    from hf_efficient.kernels import seer_attention as K

    b, h, hkv, sq, sk, d, blk = shape
    q, k, v = _qkv(b, h, hkv, sq, sk, d, dtype)
    out, pooled = K.pooled_attention(q, k, v, block=blk)
    rout, rpooled = R.pooled_attention_reference(q, k, v, block=blk)
    torch.testing.assert_close(out.float(), rout.float(), atol=_tol(dtype), rtol=_tol(dtype))
    torch.testing.assert_close(pooled, rpooled, atol=3e-3, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autotuned_sparse_kernel(dtype):
    _run_sparse((1, 32, 8, 1000, 1000, 128, 64), 0.3, dtype, None)


@pytest.mark.gpu
def test_gpu_custom_op_dispatches_to_triton():
    from hf_efficient.attention.seer import ops  # noqa: F401

    q, k, v = _qkv(1, 8, 2, 300, 300, 64, torch.bfloat16)
    idx, cnt = R.block_mask_to_indices(_mask(1, 8, 300, 300, 64, 0.5))
    out = torch.ops.hf_efficient.seer_sparse_attention(q, k, v, idx, cnt, True, 0.125, 64)
    torch.testing.assert_close(out.float(), R.sparse_attention_reference(q, k, v, idx, cnt, scale=0.125).float(),
                               atol=2e-2, rtol=2e-2)
    compiled = torch.compile(lambda *a: torch.ops.hf_efficient.seer_sparse_attention(*a, True, 0.125, 64),
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, idx, cnt), out)
