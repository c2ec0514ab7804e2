"""MoEfication of a dense SwiGLU (Llama) model into Mixtral."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient.moe import find_moe_layers
from hf_efficient.moe.moefy import balanced_clusters, moefy


def dense():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_all_experts_reproduce_the_dense_model():
    d, ids = dense(), torch.randint(0, 64, (2, 10))
    m = moefy(d, num_experts=4, top_k=4, progress=False)
    with torch.no_grad():
        ref, got = d(ids).logits, m(ids).logits
    # Same FFN as a sum of 4 neuron groups (each scaled by 4, weighted 1/4): only the summation order differs.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    layers = find_moe_layers(m)
    assert len(layers) == 2 and layers[0].num_experts == 4 and layers[0].top_k == 4


def test_router_fitted_and_top_k_changes_output():
    d, ids = dense(), torch.randint(0, 64, (2, 10))
    m = moefy(d, num_experts=4, top_k=2, calib_ids=ids, router_scale=0.05, progress=False)
    w = m.model.layers[0].mlp.gate.weight
    assert w.abs().sum() > 0
    with torch.no_grad():
        x = torch.randn(100, 32)
        assert (x @ w.T).std() < 1.0  # small logits: weights of the chosen experts stay near 1/top_k
        assert not torch.allclose(m(ids).logits, d(ids).logits)


def test_balanced_clusters_and_errors():
    a = balanced_clusters(torch.randn(48, 8), 4)
    assert torch.bincount(a).tolist() == [12] * 4
    # Rows that come in 4 well-separated directions are grouped by direction.
    base = torch.eye(8)[:4].repeat_interleave(6, 0) + 0.01 * torch.randn(24, 8)
    a = balanced_clusters(base, 4)
    assert all(len(set(a[i * 6:(i + 1) * 6].tolist())) == 1 for i in range(4))
    with pytest.raises(ValueError, match="must divide"):
        balanced_clusters(torch.randn(10, 4), 4)
    with pytest.raises(ValueError, match="top_k"):
        moefy(dense(), num_experts=4, top_k=5, progress=False)
    with pytest.raises(ValueError, match="must divide"):
        moefy(dense(), num_experts=5, top_k=2, progress=False)
