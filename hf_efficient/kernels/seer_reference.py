"""Plain-torch twins of the SeerAttention kernels (test oracles and the CPU path).

Layouts shared with :mod:`hf_efficient.kernels.seer_attention`:

* ``q``: (B, H, Sq, D); ``k``, ``v``: (B, Hkv, Sk, D) with ``H % Hkv == 0`` (GQA: query head ``h`` reads
  KV head ``h // (H // Hkv)``). Any strides.
* Causal attention aligns the last query with the last key (query ``i`` sees keys ``j <= i + Sk - Sq``),
  as transformers does for a prefill continuing a cache.
* A block mask is bool (B, H, ceil(Sq/bs), ceil(Sk/bs)); the kernels take it as sorted block indices
  ``kv_idx`` int32 (B, H, nQB, max_kept) plus ``kv_cnt`` int32 (B, H, nQB): row ``(b, h, qb)`` attends to
  key blocks ``kv_idx[b, h, qb, :kv_cnt[b, h, qb]]``; entries past the count are ignored.
"""
from __future__ import annotations

import math

import torch


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and head_dim must "
                         f"match and k, v must have one shape")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    return q.shape[1] // k.shape[1]


def causal_token_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """(Sq, Sk) bool: query ``i`` may see key ``j`` iff ``j <= i + Sk - Sq``."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def causal_block_mask(sq: int, sk: int, block: int, device=None) -> torch.Tensor:
    """(nQB, nKB) bool: key block ``kb`` holds at least one key visible to some query of block ``qb``."""
    nqb, nkb = math.ceil(sq / block), math.ceil(sk / block)
    last_q = torch.clamp(torch.arange(nqb, device=device) * block + block - 1, max=sq - 1)
    first_k = torch.arange(nkb, device=device) * block
    return first_k[None, :] <= last_q[:, None] + (sk - sq)


def expand_block_mask(block_mask: torch.Tensor, sq: int, sk: int, block: int) -> torch.Tensor:
    """Block mask (..., nQB, nKB) -> token mask (..., Sq, Sk)."""
    m = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return m[..., :sq, :sk]


def block_mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (B, H, nQB, nKB) -> ``(kv_idx, kv_cnt)`` int32, indices ascending (see module docstring)."""
    cnt = block_mask.sum(-1, dtype=torch.int32)
    # Compaction by prefix sum: kept block j goes to slot (number of kept blocks before j). Full width
    # (no trimming to the largest count) avoids a device->host sync; unused slots hold 0.
    nkb = block_mask.shape[-1]
    slot = torch.cumsum(block_mask, dim=-1) - 1
    slot = torch.where(block_mask, slot, nkb)  # dropped blocks go to a spare slot
    idx = torch.zeros(*block_mask.shape[:-1], nkb + 1, dtype=torch.int32, device=block_mask.device)
    src = torch.arange(nkb, dtype=torch.int32, device=block_mask.device).expand_as(block_mask)
    idx.scatter_(-1, slot, src)
    return idx[..., :nkb].contiguous(), cnt.contiguous()


def indices_to_block_mask(kv_idx: torch.Tensor, kv_cnt: torch.Tensor, nkb: int) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_indices`."""
    valid = torch.arange(kv_idx.shape[-1], device=kv_idx.device) < kv_cnt[..., None].long()
    mask = torch.zeros(*kv_idx.shape[:-1], nkb + 1, dtype=torch.bool, device=kv_idx.device)
    # Ignored entries scatter into a spare column that is dropped.
    mask.scatter_(-1, torch.where(valid, kv_idx.long(), nkb), True)
    return mask[..., :nkb]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        scale: float | None = None, block_mask: torch.Tensor | None = None, block: int = 64,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention in fp32, output (B, H, Sq, D) in ``q.dtype``.

    ``block_mask`` (B or 1, H or 1, nQB, nKB) bool restricts attention to kept blocks; ``token_mask``
    (broadcastable to (B, H, Sq, Sk), bool, True = may attend) adds e.g. a padding mask. Rows that may
    attend to nothing produce zeros (the kernels do the same).
    """
    groups = _check_qkv(q, k, v)
    sq, sk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_token_mask(sq, sk, q.device)
    if block_mask is not None:
        allowed = allowed & expand_block_mask(block_mask.to(q.device), sq, sk, block)
    if token_mask is not None:
        allowed = allowed & token_mask.to(q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax of all -inf is NaN
    return torch.matmul(p, vf).to(q.dtype)


def sparse_attention_reference(q, k, v, kv_idx, kv_cnt, *, causal: bool = True, scale: float | None = None,
                               block: int = 64) -> torch.Tensor:
    """Twin of the block-sparse kernel: attention restricted to the indexed key blocks."""
    nkb = math.ceil(k.shape[2] / block)
    return attention_reference(q, k, v, causal=causal, scale=scale, block=block,
                               block_mask=indices_to_block_mask(kv_idx, kv_cnt, nkb))


def attention_probs(q, k, *, causal: bool = True, scale: float | None = None,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full softmax probabilities (B, H, Sq, Sk) in fp32 (GQA expanded); masked entries are 0."""
    groups = _check_qkv(q, k, k)
    sq, sk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scale
    allowed = causal_token_mask(sq, sk, q.device) if causal else torch.ones(sq, sk, dtype=torch.bool,
                                                                            device=q.device)
    if token_mask is not None:
        allowed = allowed & token_mask.to(q.device)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def block_max_pool(p: torch.Tensor, block: int) -> torch.Tensor:
    """(..., Sq, Sk) -> (..., nQB, nKB): max over each block x block tile (ragged edges padded with 0)."""
    sq, sk = p.shape[-2:]
    nqb, nkb = math.ceil(sq / block), math.ceil(sk / block)
    padded = torch.nn.functional.pad(p, (0, nkb * block - sk, 0, nqb * block - sq))
    tiles = padded.reshape(*p.shape[:-2], nqb, block, nkb, block)
    return tiles.amax(dim=(-3, -1))


def row_normalize(m: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum (rows summing to 0 stay 0)."""
    return m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)


def pooled_attention_reference(q, k, v, *, causal: bool = True, scale: float | None = None,
                               block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of the pooled-map FlashAttention: ``(out, pooled)`` where ``out`` is dense attention and
    ``pooled`` (B, H, nQB, nKB) fp32 is the attention map max-pooled per block tile and row-normalised."""
    p = attention_probs(q, k, causal=causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    out = torch.matmul(p, v.float().repeat_interleave(groups, dim=1)).to(q.dtype)
    return out, row_normalize(block_max_pool(p, block))


# ---- gate (block scoring) and block selection: twins of kernels/seer_gate.py ---------------------------------
GATE_KINDS = {"q": ("avg",), "k": ("max", "min", "avg")}
SELECT_MODES = ("threshold", "topk", "sparsity")
# 'sparsity' keeps ceil((1 - sparsity) * n) of a row's n causal blocks, in exact integer arithmetic shared with
# the kernel: (1 - sparsity) as a multiple of 2**-24, and a 1/256 tolerance so that products that are whole
# numbers up to rounding (10 * (1 - 0.9)) are not rounded up.
_KEEP_BITS, _KEEP_SLACK = 24, 1 << 16


def keep_fraction_fixed(sparsity: float) -> int:
    return round((1.0 - sparsity) * (1 << _KEEP_BITS))


def keep_counts(n_causal, mode: str, top_k: int, sparsity: float, nkb: int):
    """Blocks to keep per row, before the forced first/diagonal blocks: int or int64 tensor like ``n_causal``.
    At least 1 (rows with no causal block keep nothing anyway)."""
    if mode == "topk":
        n = n_causal * 0 + min(top_k, nkb)
    else:
        n = (n_causal * keep_fraction_fixed(sparsity) + (1 << _KEEP_BITS) - 1 - _KEEP_SLACK) >> _KEEP_BITS
    return max(n, 1) if isinstance(n, int) else n.clamp_min(1)


def pool_blocks(x: torch.Tensor, block: int, valid: torch.Tensor | None = None, kinds=("avg",)) -> torch.Tensor:
    """Pool (B, H, S, D) per block of ``block`` tokens along S -> (B, H, nB, D * len(kinds)), fp32.

    ``valid`` (B, S) bool excludes tokens (padding) from every pool; a block without valid tokens pools to 0.
    The ragged last block pools only its real tokens.
    """
    for kind in kinds:
        if kind not in ("avg", "max", "min"):
            raise ValueError(f"pool kind {kind!r}; allowed: avg, max, min")
    b, h, s, d = x.shape
    nb = math.ceil(s / block)
    pad = nb * block - s
    if valid is None and pad == 0:
        # Common prefill case: pool a view, no masked copies of Q/K.
        xb = x.reshape(b, h, nb, block, d)
        ops = {"avg": lambda: xb.mean(3, dtype=torch.float32), "max": lambda: xb.amax(3).float(),
               "min": lambda: xb.amin(3).float()}
        return torch.cat([ops[kind]() for kind in kinds], -1)
    ok = torch.ones(b, s, dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device, torch.bool)
    ok = torch.nn.functional.pad(ok, (0, pad)).view(b, 1, nb, block, 1)
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, d)
    cnt = ok.sum(3).clamp_min(1)
    fill = {"avg": 0.0, "max": float("-inf"), "min": float("inf")}
    out = []
    for kind in kinds:
        xm = xb.masked_fill(~ok, fill[kind])
        out.append(xm.sum(3, dtype=torch.float32) / cnt if kind == "avg" else
                   (xm.amax(3) if kind == "max" else xm.amin(3)).float())
    y = torch.cat(out, -1)
    return y.masked_fill(~ok.any(3), 0.0)  # empty blocks: +-inf from max/min -> 0


_ROPE_CACHE: dict = {}


def rope_tables(n: int, dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (n, dim // 2) fp32, for block positions 0..n-1 (cached: computing them is a handful of
    launches that the fused gate would otherwise pay at every layer)."""
    key = (torch.device(device), dim, float(theta))
    tab = _ROPE_CACHE.get(key)
    if tab is None or tab[0].shape[0] < n:
        size = max(n, 2 * tab[0].shape[0] if tab is not None else 64)
        inv = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        ang = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        tab = (ang.cos(), ang.sin())
        if not torch.compiler.is_compiling():
            _ROPE_CACHE[key] = tab
    return tab[0][:n], tab[1][:n]


def block_rope(x: torch.Tensor, theta: float, first: int = 0) -> torch.Tensor:
    """Rotate-half RoPE over the last dim of (..., n, d) with position = ``first`` + index along ``n`` (decode
    rotates blocks at their absolute positions)."""
    cos, sin = rope_tables(first + x.shape[-2], x.shape[-1], theta, x.device)
    cos, sin = cos[first:], sin[first:]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def gate_features_reference(x: torch.Tensor, weight: torch.Tensor, *, kinds, block: int, theta: float,
                            scale: float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of ``seer_gate.gate_features``: pool (B, Hx, S, D) per block, project per head with ``weight``
    (Hx, D * len(kinds), g), block RoPE, times ``scale`` -> (B, Hx, nB, g) fp32."""
    pooled = pool_blocks(x, block, valid, kinds)
    return block_rope(torch.einsum("bhnd,hdg->bhng", pooled, weight.float()), theta) * scale


def gate_logits_reference(q, k, q_weight, k_weight, *, block: int, theta: float,
                          key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """AttnGate block logits (B, H, nQB, nKB) fp32, -inf where causality (or ``key_valid``) forbids a block.
    Differentiable in the weights (gate training uses it)."""
    groups = _check_qkv(q, k, k)
    qg = gate_features_reference(q, q_weight, kinds=GATE_KINDS["q"], block=block, theta=theta,
                                 scale=q_weight.shape[-1] ** -0.5)
    kg = gate_features_reference(k, k_weight, kinds=GATE_KINDS["k"], block=block, theta=theta, valid=key_valid)
    s = torch.matmul(qg, kg.repeat_interleave(groups, dim=1).transpose(-1, -2))
    allowed = causal_block_mask(q.shape[2], k.shape[2], block, q.device)
    if key_valid is not None:
        allowed = allowed & (pool_blocks(key_valid[:, None, :, None].float(), block) > 0)[:, :, None, :, 0]
    return s.masked_fill(~allowed, float("-inf"))


def select_block_mask(scores: torch.Tensor, *, mode: str, threshold: float, top_k: int, sparsity: float,
                      block: int, sq: int, sk: int) -> torch.Tensor:
    """Block mask (B, H, nQB, nKB) bool from gate scores: probabilities for 'threshold' (kept if >=
    ``threshold``), any order-preserving score (logits or probabilities) for 'topk' / 'sparsity' (kept if
    >= the row's :func:`keep_counts`-th best; ties may keep a block more). The first key block and the
    diagonal block (holding the query block's last visible key) are always kept, non-causal blocks never."""
    if mode not in SELECT_MODES:
        raise ValueError(f"mode {mode!r}; allowed: {SELECT_MODES}")
    nqb, nkb = scores.shape[-2:]
    causal = causal_block_mask(sq, sk, block, scores.device)
    if mode == "threshold":
        keep = scores >= threshold
    else:
        n_keep = keep_counts(causal.sum(-1), mode, top_k, sparsity, nkb)
        # The widest row has nkb causal blocks, so kmax is a Python int: no device->host sync.
        kmax = keep_counts(nkb, mode, top_k, sparsity, nkb)
        masked = scores.masked_fill(~causal, float("-inf"))
        top = masked.topk(kmax, dim=-1).values
        thr = top.gather(-1, (n_keep - 1).view(1, 1, nqb, 1).expand(*top.shape[:2], nqb, 1))
        keep = masked >= thr
    last = (torch.arange(nqb, device=scores.device) * block + block - 1).clamp(max=sq - 1) + sk - sq
    diag = (last.clamp(min=0) // block).clamp(max=nkb - 1)
    ar = torch.arange(nkb, device=scores.device)
    always = (ar[None, :] == 0) | (ar[None, :] == diag[:, None])
    return (keep | always) & causal


def sink_recent_block_mask(lead: tuple, sq: int, sk: int, *, sparsity: float, block: int,
                           device=None) -> torch.Tensor:
    """The trivial selection the learned gate must beat (StreamingLLM-style): the 'sparsity' budget of
    :func:`select_block_mask`, spent on each query block's first key block and its most recent ones.
    ``lead``: the leading (B, H) dims of the returned (B, H, nQB, nKB) bool mask."""
    nqb, nkb = -(-sq // block), -(-sk // block)
    recency = torch.arange(nkb, dtype=torch.float32, device=device).expand(*lead, nqb, nkb)
    return select_block_mask(recency, mode="sparsity", threshold=0.0, top_k=1, sparsity=sparsity, block=block,
                             sq=sq, sk=sk)


def gate_block_indices_reference(q, k, q_weight, k_weight, *, block: int, theta: float, mode: str,
                                 threshold: float, top_k: int, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``seer_gate.gate_block_indices``: gate logits -> block selection -> ``(kv_idx, kv_cnt)``."""
    logits = gate_logits_reference(q, k, q_weight, k_weight, block=block, theta=theta)
    scores = torch.softmax(logits, -1).nan_to_num(0.0) if mode == "threshold" else logits
    mask = select_block_mask(scores, mode=mode, threshold=threshold, top_k=top_k, sparsity=sparsity, block=block,
                             sq=q.shape[2], sk=k.shape[2])
    return block_mask_to_indices(mask)
