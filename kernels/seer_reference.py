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
