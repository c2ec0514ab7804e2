"""SeerAttention sparse decode: gate features, selection, sparse attention, feature cache, generate()."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import hf_efficient  # noqa: F401  (registers seer_attention)
from hf_efficient.attention.seer import AttnGate, SeerAttentionConfig, attach_gates, configure, gates_of, load_gates, \
    save_gates
from hf_efficient.attention.seer import decode as D
from hf_efficient.attention.seer.attention import seer_attention_forward
from hf_efficient.kernels import seer_reference as R

BLK = 16
CFG = SeerAttentionConfig(block_size=BLK, gate_dim=16, sparsity=0.0, decode="sparse")
# fp32: both sides are fp32 softmax/matmul over the same keys, differing only in summation order -> ~1e-7.
# bf16: both compute in fp32 and round once to bf16, so they differ by at most one bf16 step (2^-8 relative).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _qkv(b, g, sq, sk, d=32, hkv=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
    return q, k, v


def _gate(g, d=32, hkv=2, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return AttnGate(hkv * g, hkv, d, cfg)


CASES = [(g, sq, sk) for g in (1, 3, 4) for sq, sk in ((1, 100), (1, 96), (3, 100), (1, 9), (16, 80), (5, 37))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,sq,sk", CASES)
def test_keep_all_equals_dense(g, sq, sk, dtype):
    """Sparsity 0 keeps every block, and sparse decode is then dense causal attention."""
    q, k, v = _qkv(2, g, sq, sk, dtype=dtype)
    gate = _gate(g)
    mask = D.decode_block_mask(gate, q, k)
    assert mask.all()
    out = D.seer_decode_attention(gate, q, k, v, scale=0.2)
    torch.testing.assert_close(out, R.attention_reference(q, k, v, scale=0.2), **TOL[dtype])
    if dtype == torch.float32:  # and the SDPA transformers runs for dense decode
        dense = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=R.causal_token_mask(sq, sk), scale=0.2)
        torch.testing.assert_close(out, dense, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,sq,sk", CASES)
def test_given_blocks_equal_masked_reference(g, sq, sk, dtype):
    """Any block choice (per query head, different within a GQA group, last block dropped in some heads, rows
    with nothing kept) gives attention_reference with the same block mask."""
    q, k, v = _qkv(2, g, sq, sk, dtype=dtype, seed=1)
    nkb = -(-sk // BLK)
    mask = torch.rand(2, 2 * g, 1, nkb, generator=torch.Generator().manual_seed(g * sk)) < 0.4
    mask[0, 0] = False  # a head that keeps nothing
    out = D.sparse_decode_attention(q, k, v, mask, scale=0.2, block=BLK)
    torch.testing.assert_close(out, R.attention_reference(q, k, v, scale=0.2, block_mask=mask, block=BLK), **TOL[dtype])
    assert (out[0, 0] == 0).all()


@pytest.mark.parametrize("g,sq,sk", CASES)
def test_gate_selection_equals_masked_reference(g, sq, sk):
    gate = _gate(g, cfg=CFG.with_selection(sparsity=0.6))
    q, k, v = _qkv(1, g, sq, sk, seed=2)
    mask = D.decode_block_mask(gate, q, k)
    nkb = -(-sk // BLK)
    assert mask[..., 0].all() and mask[..., -1].all()
    budget = R.keep_counts(nkb, "sparsity", 16, 0.6, nkb)
    assert (mask.sum(-1) >= budget).all() and (mask.sum(-1) <= budget + 2).all()
    out = D.seer_decode_attention(gate, q, k, v)
    torch.testing.assert_close(out, R.attention_reference(q, k, v, block_mask=mask, block=BLK), **TOL[torch.float32])


@pytest.mark.parametrize("g", [1, 3, 4])
def test_kv_shared_selection(g):
    """decode='sparse_kv': one choice per KV head (the group's mean gate probability under the same rule),
    identical across the group's query heads, and attention equals the masked reference."""
    gate = _gate(g, cfg=CFG.with_selection(sparsity=0.7, decode="sparse_kv"))
    q, k, v = _qkv(2, g, 1, 150, seed=8)
    mask = D.decode_block_mask(gate, q, k)
    grouped = mask.reshape(2, 2, g, 1, -1)
    assert (grouped == grouped[:, :, :1]).all()
    probs = torch.softmax(D.decode_gate_logits(gate, q, k), -1).reshape(2, 2, g, 1, -1).mean(2)
    ref_mask = R.select_block_mask(probs, mode="sparsity", threshold=0.0, top_k=1, sparsity=0.7, block=BLK, sq=1,
                                   sk=150)
    assert torch.equal(grouped[:, :, 0], ref_mask)
    torch.testing.assert_close(D.seer_decode_attention(gate, q, k, v),
                               R.attention_reference(q, k, v, block_mask=mask, block=BLK), **TOL[torch.float32])


def test_gather_layouts_agree():
    """The single-copy gather of a contiguous cache equals advanced indexing on a non-contiguous one."""
    _, k, _ = _qkv(2, 1, 1, 100, hkv=3)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4], [0, 1, 2]]).expand(2, 3, 3)
    strided = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(D._gather_blocks(k, idx, BLK), D._gather_blocks(strided, idx, BLK))
    assert torch.equal(D._gather_blocks(k, idx, BLK)[0, 1, BLK:2 * BLK], k[0, 1, 3 * BLK:4 * BLK])


@pytest.mark.parametrize("sk", [97, 96, 33])
def test_decode_scores_are_the_prefill_gates(sk):
    """The decode row is the prefill gate's last row when the query chunk is that row's whole query block:
    one token in a fresh block (Sk = 97, 33) or one aligned full block (Sk = 96)."""
    gate = _gate(3, cfg=CFG)
    q, k, _ = _qkv(2, 3, sk, sk, seed=3)
    prefill = R.gate_logits_reference(q, k, gate.q_weight, gate.k_weight, block=BLK, theta=CFG.rope_theta)[:, :, -1:]
    sq = (sk - 1) % BLK + 1
    for use_cache in (False, True):
        dec = D.decode_gate_logits(gate, q[:, :, -sq:], k, use_cache=use_cache)
        torch.testing.assert_close(dec, prefill, atol=1e-5, rtol=1e-5)
    for mode in (dict(mode="sparsity", sparsity=0.5), dict(mode="topk", top_k=2),
                 dict(mode="threshold", threshold=0.1)):
        gate.config = CFG.with_selection(**mode)
        ref_mask = R.gate_block_indices_reference(q, k, gate.q_weight, gate.k_weight, block=BLK, theta=CFG.rope_theta,
                                                  mode=gate.config.mode, threshold=gate.config.threshold,
                                                  top_k=gate.config.top_k, sparsity=gate.config.sparsity)
        ref_mask = R.indices_to_block_mask(*ref_mask, -(-sk // BLK))[:, :, -1:]
        assert torch.equal(D.decode_block_mask(gate, q[:, :, -sq:], k), ref_mask)


def test_feature_cache_equals_recompute_step_by_step():
    """Growing the cache one token at a time: cached features give the recompute path's logits and masks, and
    each completed block's features are computed once (O(new) per step)."""
    gate = _gate(4, cfg=CFG.with_selection(sparsity=0.7))
    q, k, _ = _qkv(2, 4, 70, 70, seed=4)
    for sk in range(20, 71):
        qs, ks = q[:, :, sk - 1: sk], k[:, :, :sk]
        cached = D.decode_gate_logits(gate, qs, ks)
        torch.testing.assert_close(cached, D.decode_gate_logits(gate, qs, ks, use_cache=False), atol=1e-5, rtol=1e-5)
        assert torch.equal(D.decode_block_mask(gate, qs, ks), D.decode_block_mask(gate, qs, ks, use_cache=False))
    cache = D.decode_cache(gate)
    assert len(cache) == 70 // BLK and cache.computed_blocks == 70 // BLK


def test_stale_features_are_never_used():
    gate = _gate(2)
    _, ka, _ = _qkv(1, 2, 1, 120, seed=5)
    q, kb, _ = _qkv(1, 2, 1, 130, seed=6)
    cache = D.decode_cache(gate)
    D.decode_gate_logits(gate, q, ka[:, :, :100])
    assert len(cache) == 6
    # a different prompt, longer than the cached one: every block is recomputed
    torch.testing.assert_close(D.decode_gate_logits(gate, q, kb), D.decode_gate_logits(gate, q, kb, use_cache=False))
    assert cache.computed_blocks == 6 + 8
    # a prompt sharing the first 40 tokens (blocks 0, 1) with the cached one: recompute from block 2 on
    kc = torch.cat([kb[:, :, :40], ka[:, :, 40:]], 2)
    torch.testing.assert_close(D.decode_gate_logits(gate, q, kc), D.decode_gate_logits(gate, q, kc, use_cache=False))
    assert cache.computed_blocks == 14 + 5
    # the cache shrinks (cropped), then a new batch size, then new gate weights
    D.decode_gate_logits(gate, q, kc[:, :, :50])
    assert len(cache) == 3 and cache.computed_blocks == 19
    q2, k2, _ = _qkv(2, 2, 1, 50, seed=7)
    torch.testing.assert_close(D.decode_gate_logits(gate, q2, k2), D.decode_gate_logits(gate, q2, k2, use_cache=False))
    with torch.no_grad():
        gate.k_weight.mul_(2)
    torch.testing.assert_close(D.decode_gate_logits(gate, q2, k2), D.decode_gate_logits(gate, q2, k2, use_cache=False))
    # a prefill through the attention function clears it
    mod = torch.nn.Module()
    mod.seer_gate, mod.is_causal = gate, True
    seer_attention_forward(mod, *_qkv(2, 2, 40, 40)[:1], *_qkv(2, 2, 40, 40)[1:], None)
    assert len(D.decode_cache(gate)) == 0


def test_applies_only_to_plain_causal_short_chunks():
    q, k, _ = _qkv(2, 2, 3, 50)
    assert D.sparse_decode_applies(q, k, None, True, BLK)
    assert D.sparse_decode_applies(q, k, R.causal_token_mask(3, 50)[None, None].expand(2, 1, 3, 50), True, BLK)
    padded = R.causal_token_mask(3, 50)[None, None].repeat(2, 1, 1, 1)
    padded[0, ..., :5] = False
    assert not D.sparse_decode_applies(q, k, padded, True, BLK)
    assert not D.sparse_decode_applies(q, k, None, False, BLK)
    assert not D.sparse_decode_applies(*_qkv(1, 2, 17, 50)[:2], None, True, BLK)  # chunk longer than a block


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="decode.*'dense', 'sparse', 'sparse_kv'"):
        SeerAttentionConfig(decode="fast")
    with pytest.raises(ValueError, match="decode"):
        CFG.with_selection(decode="approximate")
    assert CFG.with_selection(decode="dense").decode == "dense"
    q, k, v = _qkv(1, 2, 1, 40)
    with pytest.raises(ValueError, match="block mask of shape"):
        D.sparse_decode_attention(q, k, v, torch.ones(1, 4, 1, 2, dtype=torch.bool), block=BLK)
    q, k, v = _qkv(1, 2, 17, 40)
    with pytest.raises(ValueError, match="1..block_size"):
        D.sparse_decode_attention(q, k, v, torch.ones(1, 4, 1, 3, dtype=torch.bool), block=BLK)
    with pytest.raises(ValueError, match="kv heads"):
        D.decode_gate_logits(_gate(2), *_qkv(1, 3, 1, 40)[:2])


@pytest.fixture()
def model(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    m.set_attn_implementation("sdpa")
    return m


def _gen(m, ids, n=24):
    return m.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)


def test_generate_sparse_decode(model):
    """generate() on a 2-layer Llama: sparse decode with nothing skipped reproduces dense decode (tokens and
    logits); with skipping it runs the sparse path (features cached) and its decode steps differ from dense
    decode after the same sparse prefill."""
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    dense = _gen(model, ids)
    attach_gates(model, CFG)
    out = _gen(model, ids)
    assert torch.equal(out.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(dense.logits), atol=1e-4, rtol=1e-4)
    assert all(len(D.decode_cache(g)) == (60 + 24 - 1) // BLK for g in gates_of(model))
    configure(model, sparsity=0.9, mode="sparsity")
    sparse = _gen(model, ids)
    assert not torch.allclose(torch.stack(sparse.logits), torch.stack(dense.logits), atol=1e-3)
    configure(model, decode="sparse_kv", sparsity=0.0)
    torch.testing.assert_close(torch.stack(_gen(model, ids).logits), torch.stack(dense.logits), atol=1e-4, rtol=1e-4)
    configure(model, decode="dense", sparsity=0.9)  # same sparse prefill (first logits), then dense decode steps
    dense_decode = _gen(model, ids)
    torch.testing.assert_close(dense_decode.logits[0], sparse.logits[0])
    assert not torch.allclose(torch.stack(dense_decode.logits[1:]), torch.stack(sparse.logits[1:]), atol=1e-3)


def test_generate_two_prompts_in_a_row(model):
    """A second prompt after a first generation gives what a fresh model gives (no stale decode features)."""
    attach_gates(model, CFG.with_selection(sparsity=0.8))
    a = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    fresh = copy.deepcopy(model)
    _gen(model, a)
    second = _gen(model, b)
    ref = _gen(fresh, b)
    assert torch.equal(second.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(second.logits), torch.stack(ref.logits))


def test_old_gate_files_load_with_dense_decode(model, tmp_path):
    attach_gates(model, CFG)
    save_gates(model, tmp_path)
    meta = json.loads((tmp_path / "seer_config.json").read_text())
    assert meta["seer_attention"]["decode"] == "sparse"
    del meta["seer_attention"]["decode"]  # written before the decode setting existed
    (tmp_path / "seer_config.json").write_text(json.dumps(meta))
    assert load_gates(model, tmp_path).decode == "dense"
    assert load_gates(model, tmp_path, decode="sparse").decode == "sparse"


def test_sink_recent_baseline_of_the_decode_ppl_benchmark():
    """The decode-quality benchmark's trivial rule: the first key block plus the most recent ones, with the budget
    of SeerAttention's 'sparsity' mode, exactly attended; prefill-shaped input is refused."""
    import math

    from benchmarks.seer_decode_ppl import _RECENT, sink_recent_decode
    from hf_efficient.kernels import seer_reference as ref

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 1, 32), torch.randn(1, 2, 1000, 32), torch.randn(1, 2, 1000, 32)
    _RECENT.update(sparsity=0.7, block=64)
    out, _ = sink_recent_decode(None, q, k, v, None)
    nkb = math.ceil(1000 / 64)
    n = ref.keep_counts(nkb, "sparsity", 1, 0.7, nkb)
    assert 1 < n < nkb - 1
    mask = torch.zeros(1, 6, 1, nkb, dtype=torch.bool)
    mask[..., 0] = True
    mask[..., nkb - n:] = True
    want = ref.attention_reference(q, k, v, block_mask=mask, block=64).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="single-token"):
        sink_recent_decode(None, torch.randn(1, 6, 2, 32), k, v, None)
