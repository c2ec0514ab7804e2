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
