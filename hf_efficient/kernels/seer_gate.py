"""SeerAttention's gate as a few launches: fused pooling + projection + block RoPE, one score matmul, and a
block-selection kernel that writes the block indices the sparse kernel reads.

Twins (same layouts and rules) in :mod:`hf_efficient.kernels.seer_reference`: ``gate_features_reference``,
``select_block_mask`` + ``block_mask_to_indices`` and ``gate_block_indices_reference``. The torch gate was a
chain of many small launches whose fixed cost dominated even at long contexts (docs/seer_attention.md); this
path is 4 launches whose cost scales with the data they touch (reading Q and K once, nQB x nKB scores).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import seer_reference as ref

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MODE_ID = {"threshold": 0, "topk": 1, "sparsity": 2}
BLOCKS_PER_PROGRAM = 16  # tl.dot needs >= 16 rows
TOKENS_PER_STEP = 4  # tokens of every block loaded per step: a (16, 4, D) tile keeps many loads in flight


@triton.jit
def _project_halves(acc1, acc2, x, w_ptr, swd, offs_d, offs_g, HALF: tl.constexpr):
    """acc1/acc2 += x @ W[:, :HALF] / W[:, HALF:], fp32 exact (RoPE needs both halves apart)."""
    w = w_ptr + offs_d[:, None] * swd + offs_g[None, :]
    acc1 += tl.dot(x, tl.load(w), input_precision="ieee")
    acc2 += tl.dot(x, tl.load(w + HALF), input_precision="ieee")
    return acc1, acc2


@triton.jit
def _gate_feature_kernel(X, W, COS, SIN, OUT, sxb, sxh, sxs, swh, swd, sob, soh, son,
                         H, S, NB, scale,
                         KMAXMIN: tl.constexpr, BLK: tl.constexpr, HEAD_D: tl.constexpr, HALF: tl.constexpr,
                         BM: tl.constexpr, TC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    blocks = pid * BM + tl.arange(0, BM)
    offs_t = tl.arange(0, TC)
    offs_d = tl.arange(0, HEAD_D)
    x_base = X + b * sxb + h * sxh
    total = tl.zeros([BM, HEAD_D], tl.float32)
    hi = tl.full([BM, HEAD_D], float("-inf"), tl.float32)
    lo = tl.full([BM, HEAD_D], float("inf"), tl.float32)
    for t0 in range(0, BLK, TC):
        tok = blocks[:, None] * BLK + t0 + offs_t[None, :]  # (BM, TC)
        ok = (tok < S)[:, :, None]
        x = tl.load(x_base + tok[:, :, None] * sxs + offs_d[None, None, :], mask=ok, other=0.0).to(tl.float32)
        total += tl.sum(x, 1)
        if KMAXMIN:
            hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), 1))
            lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), 1))
    n_tok = tl.minimum(tl.maximum(S - blocks * BLK, 1), BLK)
    real = (blocks < NB)[:, None]
    avg = total / n_tok[:, None].to(tl.float32)
    offs_g = tl.arange(0, HALF)
    w_base = W + h * swh
    acc1 = tl.zeros([BM, HALF], tl.float32)
    acc2 = tl.zeros([BM, HALF], tl.float32)
    if KMAXMIN:
        # Same order as the reference's concatenation: [max, min, avg] along the projection's input.
        acc1, acc2 = _project_halves(acc1, acc2, tl.where(real, hi, 0.0), w_base, swd, offs_d, offs_g, HALF)
        acc1, acc2 = _project_halves(acc1, acc2, tl.where(real, lo, 0.0), w_base + HEAD_D * swd, swd, offs_d,
                                     offs_g, HALF)
        w_base += 2 * HEAD_D * swd
    acc1, acc2 = _project_halves(acc1, acc2, avg, w_base, swd, offs_d, offs_g, HALF)
    tab = blocks[:, None] * HALF + offs_g[None, :]
    cos = tl.load(COS + tab, mask=real, other=0.0)
    sin = tl.load(SIN + tab, mask=real, other=0.0)
    out = OUT + b * sob + h * soh + blocks[:, None] * son + offs_g[None, :]
    tl.store(out, (acc1 * cos - acc2 * sin) * scale, mask=real)
    tl.store(out + HALF, (acc2 * cos + acc1 * sin) * scale, mask=real)


@triton.jit
def _select_kernel(L, IDX, CNT, slh, slq, sih, siq, sch,
                   NKB, SQ, SK, threshold, n_topk, keep_num,
                   MODE: tl.constexpr, BLK: tl.constexpr, NKB_P2: tl.constexpr,
                   KEEP_BITS: tl.constexpr, KEEP_SLACK: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    offs = tl.arange(0, NKB_P2)
    in_row = offs < NKB
    last = tl.minimum(qb * BLK + BLK - 1, SQ - 1) + SK - SQ  # last key this query block sees (may be < 0)
    causal = in_row & (offs * BLK <= last)
    x = tl.load(L + bh * slh + qb * slq + offs, mask=in_row, other=float("-inf"))
    x = tl.where(causal, x, float("-inf"))
    if MODE == 0:
        m = tl.max(x, 0)
        p = tl.math.exp(x - tl.where(m == float("-inf"), 0.0, m))
        den = tl.sum(p, 0)
        keep = p / tl.where(den > 0, den, 1.0) >= threshold
    else:
        n_causal = tl.sum(causal.to(tl.int64), 0)
        if MODE == 1:
            n_keep = n_causal * 0 + n_topk
        else:
            n_keep = (n_causal * keep_num + (1 << KEEP_BITS) - 1 - KEEP_SLACK) >> KEEP_BITS
        n_keep = tl.maximum(n_keep, 1)
        # The row's n_keep-th largest score by bisection on order-preserving integer keys of the fp32 bits
        # (+0.0 folds -0.0 onto +0.0); 32 halvings of the int32 range find it exactly, no sort.
        bits = (x + 0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = tl.where(in_row, key, -(1 << 40))
        lo = n_keep * 0 - 2147483648
        hi = n_keep * 0 + 2147483647
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int64), 0) >= n_keep
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        keep = key >= lo
    diag = tl.minimum(tl.maximum(last, 0) // BLK, NKB - 1)
    keep = (keep | (offs == 0) | (offs == diag)) & causal
    kept = keep.to(tl.int32)
    cnt = tl.sum(kept, 0)
    row = IDX + bh * sih + qb * siq
    tl.store(row + tl.cumsum(kept, 0) - 1, offs, mask=keep)  # compaction: kept block -> its rank
    tl.store(row + offs, tl.zeros_like(offs), mask=in_row & (offs >= cnt))
    tl.store(CNT + bh * sch + qb, cnt)


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def fused_supported(head_dim: int, gate_dim: int, block: int) -> bool:
    """Shapes the Triton gate handles (tl.dot wants power-of-two widths of at least 16)."""
    return _pow2(head_dim) and head_dim >= 16 and _pow2(gate_dim) and gate_dim >= 32 and block in (16, 32, 64, 128)


def gate_features(x: torch.Tensor, weight: torch.Tensor, *, maxmin: bool, block: int, theta: float,
                  scale: float = 1.0) -> torch.Tensor:
    """Pool (B, Hx, S, D) per block (avg, or max/min/avg when ``maxmin``), project with ``weight``
    (Hx, D * kinds, g), block RoPE, times ``scale`` -> (B, Hx, nB, g) fp32 contiguous."""
    bsz, hx, s, d = x.shape
    kinds = 3 if maxmin else 1
    g = weight.shape[-1]
    if weight.shape != (hx, kinds * d, g):
        raise ValueError(f"weight must be ({hx}, {kinds * d}, g) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if not fused_supported(d, g, block):
        raise ValueError(f"fused gate needs power-of-two head_dim >= 16 and gate_dim >= 32 and block in 16..128; "
                         f"got head_dim {d}, gate_dim {g}, block {block}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.float().contiguous()
    nb = math.ceil(s / block)
    cos, sin = ref.rope_tables(nb, g, theta, x.device)
    out = torch.empty(bsz, hx, nb, g, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(nb, BLOCKS_PER_PROGRAM), bsz * hx)
    _gate_feature_kernel[grid](x, weight, cos.contiguous(), sin.contiguous(), out,
                               x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
                               out.stride(0), out.stride(1), out.stride(2), hx, s, nb, scale,
                               KMAXMIN=maxmin, BLK=block, HEAD_D=d, HALF=g // 2, BM=BLOCKS_PER_PROGRAM,
                               TC=TOKENS_PER_STEP, num_warps=4 if d <= 64 else 8)
    return out


def select_block_indices(logits: torch.Tensor, *, mode: str, threshold: float, top_k: int, sparsity: float,
                         block: int, sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits (B, H, nQB, nKB) fp32 (non-causal entries are ignored) -> ``(kv_idx, kv_cnt)`` int32 with
    the rule of ``seer_reference.select_block_mask`` (softmax over the causal blocks for 'threshold')."""
    if mode not in _MODE_ID:
        raise ValueError(f"mode {mode!r}; allowed: {tuple(_MODE_ID)}")
    bsz, h, nqb, nkb = logits.shape
    if (nqb, nkb) != (math.ceil(sq / block), math.ceil(sk / block)):
        raise ValueError(f"logits {tuple(logits.shape)} do not match sq={sq}, sk={sk}, block={block}")
    logits = logits.float()
    if logits.stride(-1) != 1 or logits.stride(0) != h * logits.stride(1):
        logits = logits.contiguous()
    idx = torch.empty(bsz, h, nqb, nkb, device=logits.device, dtype=torch.int32)
    cnt = torch.empty(bsz, h, nqb, device=logits.device, dtype=torch.int32)
    p2 = triton.next_power_of_2(nkb)
    _select_kernel[(nqb, bsz * h)](logits, idx, cnt, logits.stride(1), logits.stride(2), idx.stride(1),
                                   idx.stride(2), cnt.stride(1), nkb, sq, sk, float(threshold),
                                   min(top_k, nkb), ref.keep_fraction_fixed(sparsity),
                                   MODE=_MODE_ID[mode], BLK=block, NKB_P2=p2, KEEP_BITS=ref._KEEP_BITS,
                                   KEEP_SLACK=ref._KEEP_SLACK, num_warps=2 if p2 <= 256 else (4 if p2 <= 1024 else 8))
    return idx, cnt


def gate_block_indices(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, *,
                       block: int, theta: float, mode: str, threshold: float, top_k: int,
                       sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole gate for a prefill without padding: post-RoPE ``q`` (B, H, Sq, D), ``k`` (B, Hkv, Sk, D) and
    the AttnGate weights -> ``(kv_idx, kv_cnt)`` for ``sparse_attention``. Four launches."""
    groups = ref._check_qkv(q, k, k)
    bsz, h, sq, _ = q.shape
    g = q_weight.shape[-1]
    qg = gate_features(q, q_weight, maxmin=False, block=block, theta=theta, scale=g ** -0.5)
    kg = gate_features(k, k_weight, maxmin=True, block=block, theta=theta)
    # The query heads of a KV group are adjacent, so (B, Hkv, G * nQB, g) is a view: one batched matmul, no
    # expanded copy of the key features. Scores of non-causal blocks are computed and ignored (cheaper than
    # skipping them at these sizes).
    nqb, nkb = qg.shape[2], kg.shape[2]
    logits = torch.matmul(qg.view(bsz, k.shape[1], groups * nqb, g), kg.transpose(-1, -2)).view(bsz, h, nqb, nkb)
    return select_block_indices(logits, mode=mode, threshold=threshold, top_k=top_k, sparsity=sparsity,
                                block=block, sq=sq, sk=k.shape[2])
