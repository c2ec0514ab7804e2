"""CUDA kernels of the ``torch.ops.hf_efficient.seer_*`` ops (Triton). The ops, their plain-torch reference
bodies (every other device) and their fakes are declared in :mod:`hf_efficient.ops`."""
from __future__ import annotations

from ... import ops
from ...kernels import seer_reference as ref


@ops.seer_sparse_attention.register_kernel("cuda")
def _sparse_cuda(q, k, v, kv_idx, kv_cnt, causal, scale, block):
    from ...kernels.seer_attention import sparse_attention

    return sparse_attention(q, k, v, kv_idx, kv_cnt, causal=causal, scale=scale, block=block)


@ops.seer_pooled_attention.register_kernel("cuda")
def _pooled_cuda(q, k, v, causal, scale, block):
    from ...kernels.seer_attention import pooled_attention

    return pooled_attention(q, k, v, causal=causal, scale=scale, block=block)


@ops.seer_gate_indices.register_kernel("cuda")
def _gate_cuda(q, k, q_weight, k_weight, block, theta, mode, threshold, top_k, sparsity):
    from ...kernels.seer_gate import fused_supported, gate_block_indices

    if not fused_supported(q.shape[-1], q_weight.shape[-1], block):
        # Odd widths (gate_dim < 32 or not a power of two) take the twin: same rule, just more launches.
        return ref.gate_block_indices_reference(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode,
                                                threshold=threshold, top_k=top_k, sparsity=sparsity)
    return gate_block_indices(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode, threshold=threshold,
                              top_k=top_k, sparsity=sparsity)
