"""The AttnGate (one per attention layer) and the rule that turns its block scores into a block mask.

Deviation from the paper, forced by transformers' attention interface: the attention function receives
Q and K *after* the model's RoPE, so the gate pools post-RoPE vectors; it then applies its own block-level
RoPE (position = block number) to the projected gate features, as in the paper.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels import seer_reference as ref
from ...kernels.seer_reference import pool_blocks  # noqa: F401  (public here since v1)
from .config import SeerAttentionConfig


class AttnGate(nn.Module):
    """Block-importance predictor for one attention layer.

    Q is average-pooled per block and projected per query head; K is max/min/average-pooled per block,
    concatenated and projected per KV head (GQA: the query heads of a group share it). Both get block-level
    RoPE; ``softmax(q_g . k_g / sqrt(gate_dim))`` over the causal key blocks is the predicted block map.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, config: SeerAttentionConfig):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.config = config
        g = config.gate_dim
        self.q_weight = nn.Parameter(torch.randn(num_heads, head_dim, g) / math.sqrt(head_dim))
        self.k_weight = nn.Parameter(torch.randn(num_kv_heads, 3 * head_dim, g) / math.sqrt(3 * head_dim))
        self.capture: str | None = None  # set by training/diagnostics (see training.py)
        self.records: list = []

    def logits(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Block logits (B, H, nQB, nKB) fp32, -inf where the causal structure forbids a block.

        @q: (B, H, Sq, D) post-RoPE queries; @k: (B, Hkv, Sk, D) post-RoPE keys; @key_valid: (B, Sk) bool or None.
        """
        self._check(q, k)
        return ref.gate_logits_reference(q, k, self.q_weight, self.k_weight, block=self.config.block_size,
                                         theta=self.config.rope_theta, key_valid=key_valid)

    def block_indices(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_idx, kv_cnt)`` for the block-sparse kernel, straight from post-RoPE q/k (no padding mask):
        the fused Triton gate on CUDA (pooling + projection + RoPE, one score matmul, one selection kernel),
        its plain-torch twin elsewhere. Same rule as ``select_blocks(self(q, k), ...)``."""
        self._check(q, k)
        c = self.config
        return torch.ops.hf_efficient.seer_gate_indices(q, k, self.q_weight, self.k_weight, c.block_size,
                                                        c.rope_theta, c.mode, c.threshold, c.top_k, c.sparsity)

    def _check(self, q, k):
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"AttnGate built for {self.num_heads} q heads / {self.num_kv_heads} kv heads / "
                             f"head_dim {self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}")

    def forward(self, q, k, key_valid=None) -> torch.Tensor:
        """Predicted block map: probabilities (B, H, nQB, nKB), rows summing to 1 over allowed blocks."""
        return torch.softmax(self.logits(q, k, key_valid), dim=-1).nan_to_num(0.0)


def select_blocks(scores: torch.Tensor, config: SeerAttentionConfig, sq: int, sk: int) -> torch.Tensor:
    """Block mask (B, H, nQB, nKB) bool from gate scores (probabilities, as ``AttnGate.forward`` returns).

    The rule is ``config.mode``: 'threshold' keeps scores >= ``threshold``, 'topk' keeps the ``top_k`` best,
    'sparsity' keeps ``ceil((1 - sparsity) * n)`` of the ``n`` causal blocks of each row. The first key block
    and the diagonal block (holding the query block's own last key) are always kept; blocks the causal
    structure forbids never are. See :func:`hf_efficient.kernels.seer_reference.select_block_mask`.
    """
    return ref.select_block_mask(scores, mode=config.mode, threshold=config.threshold, top_k=config.top_k,
                                 sparsity=config.sparsity, block=config.block_size, sq=sq, sk=sk)
