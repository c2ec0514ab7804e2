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


# ---- fused gate: pooling + projection + RoPE, block selection, the whole chain ----------------------------
# (B, Hx, S, D, gate_dim, block): ragged lengths, one block, several program tiles (> 16 blocks)
GATE_SHAPES = [(2, 3, 100, 32, 32, 16), (1, 2, 64, 16, 64, 16), (1, 2, 290, 16, 32, 16), (1, 1, 5, 32, 32, 64)]


@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("maxmin", [False, True])
def test_gate_features_match_reference(shape, maxmin):
    from hf_efficient.kernels import seer_gate as G

    b, hx, s, d, g, blk = shape
    x = torch.randn(b, hx, s, d, device=DEV)
    kinds = R.GATE_KINDS["k" if maxmin else "q"]
    w = torch.randn(hx, d * len(kinds), g, device=DEV) / d ** 0.5
    out = G.gate_features(x, w, maxmin=maxmin, block=blk, theta=500.0, scale=0.3)
    ref = R.gate_features_reference(x, w, kinds=kinds, block=blk, theta=500.0, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _random_logits(b, h, sq, sk, blk, ties=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, h, math.ceil(sq / blk), math.ceil(sk / blk), generator=g)
    return (x * 2).round() if ties else x  # ties: few distinct values, so ">= k-th best" keeps extra blocks


SELECT_CASES = [  # (sq, sk, block): square ragged, prefill after a cache (sq < sk), more queries than keys
    (150, 150, 16), (77, 200, 32), (100, 70, 16)]
SELECTIONS = [dict(mode="sparsity", sparsity=0.9), dict(mode="sparsity", sparsity=0.5),
              dict(mode="sparsity", sparsity=0.0), dict(mode="topk", top_k=3), dict(mode="topk", top_k=10_000),
              dict(mode="threshold", threshold=0.05), dict(mode="threshold", threshold=0.0)]


def _select_args(sel):
    return dict(mode=sel["mode"], threshold=sel.get("threshold", 0.0), top_k=sel.get("top_k", 1),
                sparsity=sel.get("sparsity", 0.0))


@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("sel,ties", [(s, False) for s in SELECTIONS] + [(SELECTIONS[0], True), (SELECTIONS[3], True)])
def test_select_kernel_matches_reference(case, sel, ties):
    from hf_efficient.kernels import seer_gate as G

    sq, sk, blk = case
    logits = _random_logits(2, 3, sq, sk, blk, ties).to(DEV)
    args = dict(_select_args(sel), block=blk, sq=sq, sk=sk)
    idx, cnt = G.select_block_indices(logits, **args)
    causal = R.causal_block_mask(sq, sk, blk, DEV)
    masked = logits.masked_fill(~causal, float("-inf"))
    scores = torch.softmax(masked, -1).nan_to_num(0.0) if sel["mode"] == "threshold" else masked
    ridx, rcnt = R.block_mask_to_indices(R.select_block_mask(scores, **args))
    assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)  # unused slots are 0 in both


def test_select_kernel_drops_what_it_should():
    """Not only equal to the twin: 90 % sparsity keeps ~10 % + forced blocks, and the kept ones are the best."""
    from hf_efficient.kernels import seer_gate as G

    blk, sq = 16, 16 * 200
    logits = _random_logits(1, 1, sq, sq, blk).to(DEV)
    idx, cnt = G.select_block_indices(logits, mode="sparsity", threshold=0.0, top_k=1, sparsity=0.9, block=blk,
                                      sq=sq, sk=sq)
    n_causal = torch.arange(1, 201, device=DEV)
    assert (cnt >= torch.ceil(n_causal * 0.1 - 1e-3)).all() and (cnt <= torch.ceil(n_causal * 0.1 - 1e-3) + 2).all()
    row = 150  # 151 causal blocks, keeps 16 (+ first, diagonal when not among the best)
    kept = idx[0, 0, row, : cnt[0, 0, row]].long()
    free = torch.ones(151, dtype=torch.bool, device=DEV)
    free[[0, 150]] = False
    chosen = torch.zeros_like(free)
    chosen[kept] = True
    assert logits[0, 0, row, :151][chosen & free].min() > logits[0, 0, row, :151][~chosen & free].max()


@pytest.mark.parametrize("shape", [(1, 4, 2, 150, 150, 32, 16, 32), (2, 4, 1, 77, 77, 16, 16, 64),
                                   (1, 6, 3, 300, 300, 32, 32, 32)])
@pytest.mark.parametrize("sel", [dict(mode="sparsity", sparsity=0.7), dict(mode="topk", top_k=2),
                                 dict(mode="threshold", threshold=0.1)])
def test_fused_gate_matches_reference_chain(shape, sel):
    from hf_efficient.kernels import seer_gate as G

    b, h, hkv, sq, sk, d, blk, g = shape
    q, k, _ = _qkv(b, h, hkv, sq, sk, d)
    wq = torch.randn(h, d, g, device=DEV) / d ** 0.5
    wk = torch.randn(hkv, 3 * d, g, device=DEV) / (3 * d) ** 0.5
    args = dict(_select_args(sel), block=blk, theta=10000.0)
    idx, cnt = G.gate_block_indices(q, k, wq, wk, **args)
    ridx, rcnt = R.gate_block_indices_reference(q, k, wq, wk, **args)
    assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)


def test_gate_kernel_bad_input():
    from hf_efficient.kernels import seer_gate as G

    x = torch.randn(1, 2, 64, 32, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        G.gate_features(x, torch.randn(2, 32, 32, device=DEV), maxmin=True, block=16, theta=1e4)
    with pytest.raises(ValueError, match="gate_dim"):
        G.gate_features(x, torch.randn(2, 32, 24, device=DEV), maxmin=False, block=16, theta=1e4)
    with pytest.raises(ValueError, match="mode"):
        G.select_block_indices(torch.randn(1, 1, 4, 4, device=DEV), mode="best", threshold=0.0, top_k=1,
                               sparsity=0.0, block=16, sq=64, sk=64)
    with pytest.raises(ValueError, match="do not match"):
        G.select_block_indices(torch.randn(1, 1, 4, 4, device=DEV), mode="topk", threshold=0.0, top_k=1,
                               sparsity=0.0, block=16, sq=80, sk=64)


def test_gate_op_fake_and_cpu():
    from hf_efficient.attention.seer import ops  # noqa: F401

    q, k, _ = _qkv(1, 4, 2, 40, 40, 16, device="cpu")
    wq, wk = torch.randn(4, 16, 32), torch.randn(2, 48, 32)
    torch.library.opcheck(torch.ops.hf_efficient.seer_gate_indices,
                          (q, k, wq, wk, 16, 1e4, "sparsity", 0.0, 1, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


# ---- GPU: the fused gate at real sizes -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 8, 2049, 128, 64, 128), (2, 8, 2, 1000, 64, 64, 64),
                                   (1, 9, 3, 4096, 64, 64, 64), (1, 4, 4, 3000, 128, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fused_gate(shape, dtype):
    from hf_efficient.kernels import seer_gate as G

    b, h, hkv, s, d, blk, g = shape
    q, k, _ = _qkv(b, h, hkv, s, s, d, dtype)
    wq = torch.randn(h, d, g, device=DEV) / d ** 0.5
    wk = torch.randn(hkv, 3 * d, g, device=DEV) / (3 * d) ** 0.5
    for x, w, maxmin in ((q, wq, False), (k, wk, True)):
        kinds = R.GATE_KINDS["k" if maxmin else "q"]
        torch.testing.assert_close(G.gate_features(x, w, maxmin=maxmin, block=blk, theta=1e4),
                                   R.gate_features_reference(x, w, kinds=kinds, block=blk, theta=1e4),
                                   atol=1e-4, rtol=1e-4)
    for sel in (dict(mode="sparsity", sparsity=0.9), dict(mode="topk", top_k=7),
                dict(mode="threshold", threshold=0.01)):
        args = dict(_select_args(sel), block=blk, theta=1e4)
        idx, cnt = G.gate_block_indices(q, k, wq, wk, **args)
        ridx, rcnt = R.gate_block_indices_reference(q, k, wq, wk, **args)
        # Same rule; fp32 rounding (matmul order) may flip a near-tie at the selection boundary.
        nkb = idx.shape[-1]
        m, rm = R.indices_to_block_mask(idx, cnt, nkb), R.indices_to_block_mask(ridx, rcnt, nkb)
        assert (m != rm).float().mean() < 1e-3 and (cnt - rcnt).abs().max() <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("nkb", [512, 2048])
@pytest.mark.parametrize("sel", SELECTIONS)
def test_gpu_select_kernel_long_rows(nkb, sel):
    from hf_efficient.kernels import seer_gate as G

    s = 64 * nkb - 17
    logits = _random_logits(1, 4, s, s, 64, seed=nkb).to(DEV)
    args = dict(_select_args(sel), block=64, sq=s, sk=s)
    idx, cnt = G.select_block_indices(logits, **args)
    causal = R.causal_block_mask(s, s, 64, DEV)
    masked = logits.masked_fill(~causal, float("-inf"))
    scores = torch.softmax(masked, -1).nan_to_num(0.0) if sel["mode"] == "threshold" else masked
    ridx, rcnt = R.block_mask_to_indices(R.select_block_mask(scores, **args))
    if sel["mode"] == "threshold":  # softmax rounding differs; compare away from the threshold only
        m = R.indices_to_block_mask(idx, cnt, nkb)
        rm = R.indices_to_block_mask(ridx, rcnt, nkb)
        assert not (m != rm)[(scores - sel["threshold"]).abs() > 1e-5].any()
    else:
        assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)
