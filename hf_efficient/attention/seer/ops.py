"""``torch.ops.hf_efficient.seer_*``: the SeerAttention kernels as custom ops (Triton on CUDA, the plain-torch
twin elsewhere), with fake implementations so ``torch.compile`` and meta tensors trace through them."""
from __future__ import annotations

import torch

from ...kernels import seer_reference as ref


def _bshd_view(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> same values as a view of a contiguous (B, S, H, D) buffer (the kernels' layout)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("hf_efficient::seer_sparse_attention", mutates_args=())
def seer_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                          kv_cnt: torch.Tensor, causal: bool, scale: float, block: int) -> torch.Tensor:
    """Block-sparse attention; see :func:`hf_efficient.kernels.seer_attention.sparse_attention`."""
    return _bshd_view(ref.sparse_attention_reference(q, k, v, kv_idx, kv_cnt, causal=causal, scale=scale,
                                                     block=block))


@seer_sparse_attention.register_kernel("cuda")
def _sparse_cuda(q, k, v, kv_idx, kv_cnt, causal, scale, block):
    from ...kernels.seer_attention import sparse_attention

    return sparse_attention(q, k, v, kv_idx, kv_cnt, causal=causal, scale=scale, block=block)


@seer_sparse_attention.register_fake
def _sparse_fake(q, k, v, kv_idx, kv_cnt, causal, scale, block):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


@torch.library.custom_op("hf_efficient::seer_pooled_attention", mutates_args=())
def seer_pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                          block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention + block-max-pooled row-normalised map; see ``kernels.seer_attention.pooled_attention``."""
    out, pooled = ref.pooled_attention_reference(q, k, v, causal=causal, scale=scale, block=block)
    return _bshd_view(out), pooled


@seer_pooled_attention.register_kernel("cuda")
def _pooled_cuda(q, k, v, causal, scale, block):
    from ...kernels.seer_attention import pooled_attention

    return pooled_attention(q, k, v, causal=causal, scale=scale, block=block)


@seer_pooled_attention.register_fake
def _pooled_fake(q, k, v, causal, scale, block):
    b, h, s, d = q.shape
    nkb = -(-k.shape[2] // block)
    return q.new_empty(b, s, h, d).transpose(1, 2), q.new_empty(b, h, -(-s // block), nkb, dtype=torch.float32)


@torch.library.custom_op("hf_efficient::seer_gate_indices", mutates_args=())
def seer_gate_indices(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, block: int,
                      theta: float, mode: str, threshold: float, top_k: int,
                      sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnGate scoring + block selection -> ``(kv_idx, kv_cnt)``; see ``kernels.seer_gate.gate_block_indices``."""
    return ref.gate_block_indices_reference(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode,
                                            threshold=threshold, top_k=top_k, sparsity=sparsity)


@seer_gate_indices.register_kernel("cuda")
def _gate_cuda(q, k, q_weight, k_weight, block, theta, mode, threshold, top_k, sparsity):
    from ...kernels.seer_gate import fused_supported, gate_block_indices

    if not fused_supported(q.shape[-1], q_weight.shape[-1], block):
        # Odd widths (gate_dim < 32 or not a power of two) take the twin: same rule, just more launches.
        return ref.gate_block_indices_reference(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode,
                                                threshold=threshold, top_k=top_k, sparsity=sparsity)
    return gate_block_indices(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode, threshold=threshold,
                              top_k=top_k, sparsity=sparsity)


@seer_gate_indices.register_fake
def _gate_fake(q, k, q_weight, k_weight, block, theta, mode, threshold, top_k, sparsity):
    b, h, s, _ = q.shape
    nqb, nkb = -(-s // block), -(-k.shape[2] // block)
    return q.new_empty(b, h, nqb, nkb, dtype=torch.int32), q.new_empty(b, h, nqb, dtype=torch.int32)
