"""SeerAttention Triton kernels: block-sparse FlashAttention prefill and FlashAttention with a pooled map.

Layouts and masking rules are those of :mod:`hf_efficient.kernels.seer_reference` (the twins):
``q`` (B, H, Sq, D), ``k``/``v`` (B, Hkv, Sk, D), any strides with a contiguous last dim, GQA by
``h // (H // Hkv)``, causal aligned at the end (query ``i`` sees keys ``j <= i + Sk - Sq``). Both kernels
return the output as a (B, H, Sq, D) *view* of a contiguous (B, Sq, H, D) buffer, the layout transformers
wants after attention, so ``out.transpose(1, 2)`` is free. fp16/bf16/fp32 inputs, fp32 accumulation.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


def _sparse_configs():
    if _INTERPRET:
        return [triton.Config({"PAIR": 1}, num_warps=4, num_stages=1)]
    return [triton.Config({"PAIR": p}, num_warps=w, num_stages=s)
            for p in (1, 2) for w, s in ((4, 3), (8, 3), (4, 4))]


@triton.jit
def _tile_setup(Q, K, V, sqb, sqh, sqs, skb, skh, svb, svh, H, S_Q, S_K,
                GROUPS: tl.constexpr, BLK: tl.constexpr, HEAD_D: tl.constexpr):
    """This program's (query block, batch*head): its query rows, their Q tile and its K/V head's bases."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = qb * BLK + tl.arange(0, BLK)
    offs_d = tl.arange(0, HEAD_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=offs_m[:, None] < S_Q,
                other=0.0)
    hk = h // GROUPS
    return qb, b, h, S_K - S_Q, offs_m, offs_d, q, K + b * skb + hk * skh, V + b * svb + hk * svh


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """One FlashAttention update with a (BLK, N) tile of log2-scaled scores ``s`` (-inf = masked)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.autotune(configs=_sparse_configs(), key=["HEAD_D", "BLK", "CAUSAL", "GROUPS"])
@triton.jit
def _sparse_fwd_kernel(Q, K, V, O, IDX, CNT, sm_scale_log2,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                       sib, sih, siq, scb, sch,
                       H, S_Q, S_K, WIDTH,
                       GROUPS: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, HEAD_D: tl.constexpr,
                       PAIR: tl.constexpr):
    qb, b, h, diff, offs_m, offs_d, q, k_base, v_base = _tile_setup(
        Q, K, V, sqb, sqh, sqs, skb, skh, svb, svh, H, S_Q, S_K, GROUPS, BLK, HEAD_D)
    r = tl.arange(0, BLK * PAIR)
    idx_base = IDX + b * sib + h * sih + qb * siq
    cnt = tl.load(CNT + b * scb + h * sch + qb)
    m_i = tl.full([BLK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLK], tl.float32)
    acc = tl.zeros([BLK, HEAD_D], tl.float32)
    first_q = qb * BLK + diff
    for j in range(0, cnt, PAIR):
        kb0 = tl.load(idx_base + j)
        if PAIR == 1:
            kb_last = kb0
            offs_n = kb0 * BLK + r
            partial = False
        else:
            # Two kept blocks per step make a 2*BLK-wide tile of gathered rows (better tensor-core use
            # than BLK-wide steps); a missing second block gets negative offsets and is masked.
            has1 = j + 1 < cnt
            kb1 = tl.load(idx_base + j + 1, mask=has1 & (j + 1 < WIDTH), other=-1)
            kb_last = tl.where(has1, kb1, kb0)
            offs_n = tl.where(r < BLK, kb0 * BLK + r, kb1 * BLK + (r - BLK))
            partial = j + 1 >= cnt
        n_ok = (offs_n >= 0) & (offs_n < S_K)
        k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        s = tl.dot(q, k) * sm_scale_log2
        last_k = kb_last * BLK + BLK - 1
        if CAUSAL:
            need_mask = (last_k > first_q) | (last_k >= S_K) | partial
        else:
            need_mask = (last_k >= S_K) | partial
        if need_mask:
            ok = n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + diff)
            s = tl.where(ok, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < S_Q)


@triton.jit
def _masked_scores(q, k_base, offs_n, offs_m, offs_d, m_ok, sks, S_K, diff, sm_scale_log2, CAUSAL: tl.constexpr):
    """Log2-scaled scores of the Q tile against keys ``offs_n``, -inf where masked."""
    ok = (offs_n[None, :] < S_K) & m_ok[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + diff)
    k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None], mask=offs_n[None, :] < S_K, other=0.0)
    return tl.where(ok, tl.dot(q, k) * sm_scale_log2, float("-inf"))


@triton.jit
def _pooled_fwd_kernel(Q, K, V, O, MAP, sm_scale_log2,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                       smb, smh, smq,
                       H, S_Q, S_K,
                       GROUPS: tl.constexpr, CAUSAL: tl.constexpr, BLK: tl.constexpr, HEAD_D: tl.constexpr):
    qb, b, h, diff, offs_m, offs_d, q, k_base, v_base = _tile_setup(
        Q, K, V, sqb, sqh, sqs, skb, skh, svb, svh, H, S_Q, S_K, GROUPS, BLK, HEAD_D)
    offs_b = tl.arange(0, BLK)
    m_ok = offs_m < S_Q
    if CAUSAL:
        hi = tl.minimum(S_K, qb * BLK + BLK + diff)
    else:
        hi = S_K
    n_blocks = tl.cdiv(hi, BLK)
    m_i = tl.full([BLK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLK], tl.float32)
    acc = tl.zeros([BLK, HEAD_D], tl.float32)
    # Pass 1: ordinary FlashAttention, giving the output and each row's log-sum-exp.
    for kb in range(0, n_blocks):
        offs_n = kb * BLK + offs_b
        s = _masked_scores(q, k_base, offs_n, offs_m, offs_d, m_ok, sks, S_K, diff, sm_scale_log2, CAUSAL)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=offs_n[:, None] < S_K, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], (acc / l_safe[:, None]).to(
        O.dtype.element_ty), mask=m_ok[:, None])
    # Pass 2: recompute the scores and keep, per key block, the max of the final probabilities
    # exp2(s - lse2). This never holds more than one tile of the attention map.
    lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf"))
    map_base = MAP + b * smb + h * smh + qb * smq
    for kb in range(0, n_blocks):
        offs_n = kb * BLK + offs_b
        s = _masked_scores(q, k_base, offs_n, offs_m, offs_d, m_ok, sks, S_K, diff, sm_scale_log2, CAUSAL)
        p = tl.math.exp2(s - lse2[:, None])
        tl.store(map_base + kb, tl.max(tl.max(p, 1), 0))


def _check(q, k, v, block):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q (B,H,Sq,D) and k, v (B,Hkv,Sk,D) expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch/head_dim must match, heads divide")
    d = q.shape[3]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be one of 16, 32, 64, 128, 256 for the Triton kernels, got {d}")
    if block not in (16, 32, 64, 128):
        raise ValueError(f"block must be one of 16, 32, 64, 128, got {block}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v


def _out(q):
    b, h, s, d = q.shape
    return torch.empty(b, s, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                     kv_cnt: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                     block: int = 64, pair: int | None = None) -> torch.Tensor:
    """Block-sparse FlashAttention forward.

    @kv_idx: int32 (B, H, ceil(Sq/block), W), ascending kept key-block numbers per query block
    @kv_cnt: int32 (B, H, ceil(Sq/block)), how many entries of ``kv_idx`` are valid (<= W)
    @pair: key blocks per inner step (1 or 2); None lets the autotuner choose (tests pin it)
    Returns (B, H, Sq, D) in q.dtype (a view of a contiguous (B, Sq, H, D) buffer).
    """
    q, k, v = _check(q, k, v, block)
    bsz, h, sq, d = q.shape
    nqb = math.ceil(sq / block)
    if kv_idx.shape[:3] != (bsz, h, nqb) or kv_cnt.shape != (bsz, h, nqb):
        raise ValueError(f"kv_idx must be (B, H, nQB, W) = ({bsz}, {h}, {nqb}, W) and kv_cnt (B, H, nQB); got "
                         f"{tuple(kv_idx.shape)} and {tuple(kv_cnt.shape)}")
    kv_idx = kv_idx.to(torch.int32).contiguous()
    kv_cnt = kv_cnt.to(torch.int32).contiguous()
    out = _out(q)
    scale = d ** -0.5 if scale is None else scale
    args = (q, k, v, out, kv_idx, kv_cnt, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2), kv_cnt.stride(0), kv_cnt.stride(1),
            h, sq, k.shape[2], kv_idx.shape[3])
    meta = dict(GROUPS=h // k.shape[1], CAUSAL=causal, BLK=block, HEAD_D=d)
    if pair is None:
        _sparse_fwd_kernel[(nqb, bsz * h)](*args, **meta)
    else:
        if pair not in (1, 2):
            raise ValueError(f"pair must be 1 or 2, got {pair}")
        _sparse_fwd_kernel.fn[(nqb, bsz * h)](*args, **meta, PAIR=pair, num_warps=4,
                                              num_stages=1 if _INTERPRET else 2)
    return out


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     scale: float | None = None, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense FlashAttention forward that also emits the block-max-pooled, row-normalised attention map.

    Returns ``(out, pooled)``: out (B, H, Sq, D) as in :func:`sparse_attention`; pooled fp32
    (B, H, ceil(Sq/block), ceil(Sk/block)) with each row summing to 1 (0 for rows that see nothing).
    """
    q, k, v = _check(q, k, v, block)
    bsz, h, sq, d = q.shape
    sk = k.shape[2]
    nqb, nkb = math.ceil(sq / block), math.ceil(sk / block)
    out = _out(q)
    pooled = torch.zeros(bsz, h, nqb, nkb, device=q.device, dtype=torch.float32)
    scale = d ** -0.5 if scale is None else scale
    _pooled_fwd_kernel[(nqb, bsz * h)](
        q, k, v, out, pooled, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pooled.stride(0), pooled.stride(1), pooled.stride(2),
        h, sq, sk, GROUPS=h // k.shape[1], CAUSAL=causal, BLK=block, HEAD_D=d,
        num_warps=4, num_stages=2 if not _INTERPRET else 1)
    return out, pooled / pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
