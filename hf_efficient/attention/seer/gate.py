"""The AttnGate (one per attention layer) and the rule that turns its block scores into a block mask.

Deviation from the paper, forced by transformers' attention interface: the attention function receives
Q and K *after* the model's RoPE, so the gate pools post-RoPE vectors; it then applies its own block-level
RoPE (position = block number) to the projected gate features, as in the paper.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels.seer_reference import causal_block_mask
from .config import SeerAttentionConfig


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of (..., n, d) with position = index along ``n``."""
    n, d = x.shape[-2:]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def pool_blocks(x: torch.Tensor, block: int, valid: torch.Tensor | None = None, kinds=("avg",)) -> torch.Tensor:
    """Pool (B, H, S, D) per block of ``block`` tokens along S -> (B, H, nB, D * len(kinds)), fp32.

    ``valid`` (B, S) bool excludes tokens (padding) from every pool; a block without valid tokens pools to 0.
    The ragged last block averages only its real tokens.
    """
    b, h, s, d = x.shape
    nb = math.ceil(s / block)
    pad = nb * block - s
    if valid is None and pad == 0:
        # Common prefill case: pool a view, no masked copies of Q/K (the gate's main memory traffic).
        xb = x.reshape(b, h, nb, block, d)
        ops = {"avg": lambda: xb.mean(3, dtype=torch.float32), "max": lambda: xb.amax(3).float(),
               "min": lambda: xb.amin(3).float()}
        for kind in kinds:
            if kind not in ops:
                raise ValueError(f"pool kind {kind!r}; allowed: avg, max, min")
        return torch.cat([ops[kind]() for kind in kinds], -1)
    ok = torch.ones(b, s, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device, torch.bool)
    ok = nn.functional.pad(ok, (0, pad)).view(b, 1, nb, block, 1)
    xb = nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, d)
    cnt = ok.sum(3).clamp_min(1)
    out = []
    for kind in kinds:
        if kind == "avg":
            out.append(xb.masked_fill(~ok, 0).sum(3, dtype=torch.float32) / cnt)
        elif kind == "max":
            out.append(xb.masked_fill(~ok, float("-inf")).amax(3).float())
        elif kind == "min":
            out.append(xb.masked_fill(~ok, float("inf")).amin(3).float())
        else:
            raise ValueError(f"pool kind {kind!r}; allowed: avg, max, min")
    y = torch.cat(out, -1)
    return y.masked_fill(~ok.any(3), 0.0)  # empty blocks: +-inf from max/min -> 0


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
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"AttnGate built for {self.num_heads} q heads / {self.num_kv_heads} kv heads / "
                             f"head_dim {self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
        blk, theta = self.config.block_size, self.config.rope_theta
        qp = pool_blocks(q, blk)
        kp = pool_blocks(k, blk, key_valid, kinds=("max", "min", "avg"))
        qg = _rope(torch.einsum("bhnd,hdg->bhng", qp, self.q_weight.float()), theta)
        kg = _rope(torch.einsum("bhnd,hdg->bhng", kp, self.k_weight.float()), theta)
        kg = kg.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        s = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(self.config.gate_dim)
        allowed = causal_block_mask(q.shape[2], k.shape[2], blk, q.device)
        if key_valid is not None:
            allowed = allowed & (pool_blocks(key_valid[:, None, :, None].float(), blk) > 0)[:, :, None, :, 0]
        return s.masked_fill(~allowed, float("-inf"))

    def forward(self, q, k, key_valid=None) -> torch.Tensor:
        """Predicted block map: probabilities (B, H, nQB, nKB), rows summing to 1 over allowed blocks."""
        return torch.softmax(self.logits(q, k, key_valid), dim=-1).nan_to_num(0.0)


def select_blocks(scores: torch.Tensor, config: SeerAttentionConfig, sq: int, sk: int) -> torch.Tensor:
    """Block mask (B, H, nQB, nKB) bool from gate scores (probabilities or logits, -inf/0 where forbidden).

    The rule is ``config.mode``: 'threshold' keeps scores >= ``threshold`` (probabilities expected),
    'topk' keeps the ``top_k`` best, 'sparsity' keeps ``ceil((1 - sparsity) * n)`` of the ``n`` causal
    blocks of each row. The first key block and the diagonal block (holding the query block's own last
    key) are always kept; blocks the causal structure forbids never are.
    """
    blk = config.block_size
    nqb, nkb = scores.shape[-2:]
    causal = causal_block_mask(sq, sk, blk, scores.device)
    if config.mode == "threshold":
        keep = scores >= config.threshold
    else:
        if config.mode == "topk":
            n_keep = torch.full((nqb,), config.top_k, device=scores.device)
        else:
            n_keep = torch.ceil(causal.sum(-1) * (1.0 - config.sparsity) - 1e-6).long()
        # Keep scores >= the row's n_keep-th best (a top-k threshold: cheaper on GPU than ranking every
        # block with a full sort; ties at the threshold may keep a block more).
        masked = scores.masked_fill(~causal, float("-inf"))
        # The widest row has nkb causal blocks, so kmax follows from Python ints: no device->host sync.
        kmax = min(nkb, config.top_k) if config.mode == "topk" else math.ceil(nkb * (1.0 - config.sparsity) - 1e-6)
        kmax = max(1, kmax)
        top = masked.topk(kmax, dim=-1).values
        thr = top.gather(-1, (n_keep.clamp(1, kmax) - 1).view(1, 1, nqb, 1).expand(*top.shape[:2], nqb, 1))
        keep = (masked >= thr) & (n_keep > 0)[:, None]
    diag = torch.clamp((torch.arange(nqb, device=scores.device) * blk + blk - 1).clamp(max=sq - 1) + sk - sq,
                       min=0) // blk
    always = torch.zeros(nqb, nkb, dtype=torch.bool, device=scores.device)
    always[:, 0] = True
    always[torch.arange(nqb, device=scores.device), diag.clamp(max=nkb - 1)] = True
    return (keep | always) & causal
