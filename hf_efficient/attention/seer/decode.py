"""Sparse decode: the layer's trained AttnGate picks the KV blocks a decode query attends to.

Used by ``attn_implementation="seer_attention"`` when a few queries (1 <= Sq <= block_size, Sq < Sk) run
on a KV cache and ``SeerAttentionConfig.decode`` is ``"sparse"`` (each query head keeps its own blocks, the
prefill rule) or ``"sparse_kv"`` (one choice per KV head from the group's mean gate probability, as
SeerAttention-R shares decode sparsity within a GQA group: the gather then reads only the kept blocks).
Plain torch (the CPU path and the oracle for any later kernel). Why both: plain torch must copy kept blocks
before its matmuls, so a step costs ~3x the gathered share of a dense pass; per-head choices gather the
union of a GQA group's blocks (75-95 % at 50-70 % sparsity with random gates), shared ones only the kept
blocks (benchmarks/seer_decode.py). For one step with queries at positions ``Sk-Sq .. Sk-1``:

1. **Key-block features**, exactly as the prefill gate makes them (:func:`pool_blocks` max/min/avg per block,
   per-KV-head projection, block RoPE at the block's index), for every key block including the partial last
   one. Completed blocks never change, so their features are kept in a :class:`DecodeGateCache` on the gate
   and each step computes only blocks completed since the last step plus the (cheap, <= block_size tokens)
   partial block: O(new) instead of O(Sk).
2. **Query feature**: the Sq query tokens average-pooled into one vector, projected per query head, with
   block RoPE at the block of the last query (the "diagonal" block, as in prefill, where a query block's
   feature is rotated by its own block index). For Sq = 1 at position p this is precisely the feature the
   prefill gate gives a query block holding only token p; for a chunk of exactly one aligned block it is the
   prefill feature of that block — tests check both.
3. **Selection**: one row of scores over the key blocks, turned into a block mask by the prefill rule
   (:func:`hf_efficient.kernels.seer_reference.select_block_mask`, same modes, integer keep counts, first
   block and the current block always kept).
4. **Attention** over the kept blocks only: the kept full blocks are gathered per KV head (the union over
   the query heads of the group, so GQA reads each kept block once), each query head is masked to its own
   blocks, the partial last block is used in place; one exact fp32 softmax, causal w.r.t. query positions.

Why one score row for all Sq queries (rather than one per query block as in prefill): Sq <= block_size, so
the queries touch at most two blocks, and a shared row keeps the gather to one pass. Longer chunks
(Sq > block_size, chunked prefill) and padded batches run dense (see :func:`sparse_decode_applies`).

The feature cache is validated on every step, so a stale entry is never used: it is dropped when batch,
heads, dtype, device or the gate weights change, truncated when the cache shrinks, and checked against a
fingerprint (the first 16 channels of the last key of every cached block, compared exactly) so a new
prompt recomputes from its first differing block. The prefill path also clears it (a new sequence).
"""
from __future__ import annotations

import torch

from ...kernels import seer_reference as ref

_MARK_DIMS = 16  # channels of each block's last key kept as its fingerprint


def key_block_features(gate, key: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Gate K features (B, Hkv, stop-start, g) fp32 of key blocks ``start .. stop-1`` of ``key`` (B, Hkv, Sk, D),
    at their absolute block positions (the last block may be partial)."""
    blk, theta = gate.config.block_size, gate.config.rope_theta
    x = key[:, :, start * blk: min(stop * blk, key.shape[2])]
    pooled = ref.pool_blocks(x, blk, kinds=ref.GATE_KINDS["k"])
    return ref.block_rope(torch.einsum("bhnd,hdg->bhng", pooled, gate.k_weight.float()), theta, start)


def query_feature(gate, query: torch.Tensor, sk: int) -> torch.Tensor:
    """Gate Q feature (B, H, 1, g) fp32 of the Sq query tokens (the last at position ``sk - 1``)."""
    c = gate.config
    pooled = ref.pool_blocks(query, query.shape[2], kinds=ref.GATE_KINDS["q"])  # one "block": all Sq tokens
    proj = torch.einsum("bhnd,hdg->bhng", pooled, gate.q_weight.float())
    return ref.block_rope(proj, c.rope_theta, (sk - 1) // c.block_size) * gate.q_weight.shape[-1] ** -0.5


class DecodeGateCache:
    """K gate features of the completed key blocks of one layer's running sequence (lives on the AttnGate,
    not in its state dict: it is per-sequence, never saved)."""

    def __init__(self):
        self.feats: torch.Tensor | None = None   # (B, Hkv, n, g) fp32
        self.marks: torch.Tensor | None = None   # (B, Hkv, n, <=16) fingerprint, key dtype
        self.meta: tuple | None = None
        self.computed_blocks = 0                  # blocks computed since creation (tests / diagnostics)

    def __len__(self) -> int:
        return 0 if self.feats is None else self.feats.shape[2]

    def features(self, gate, key: torch.Tensor) -> torch.Tensor:
        """Features of all completed blocks of ``key``: cached ones validated, new ones computed."""
        blk = gate.config.block_size
        n_full = key.shape[2] // blk
        w = gate.k_weight
        meta = (key.shape[0], key.shape[1], key.shape[3], key.dtype, key.device, w.data_ptr(), w._version,
                blk, gate.config.rope_theta)
        if meta != self.meta:
            self.feats = self.marks = None
            self.meta = meta
        keep = min(len(self), n_full)
        if keep:
            marks = key[:, :, blk - 1: keep * blk: blk, :_MARK_DIMS].contiguous()
            if not torch.equal(marks, self.marks[:, :, :keep]):
                same = (marks == self.marks[:, :, :keep]).flatten(3).all(-1).all(1).all(0)
                keep = int(same.long().cumprod(0).sum())  # blocks before the first difference
        if keep < n_full or keep < len(self):
            old_f = self.feats[:, :, :keep] if keep else None
            old_m = self.marks[:, :, :keep] if keep else None
            new_f = key_block_features(gate, key, keep, n_full) if n_full > keep else None
            new_m = key[:, :, keep * blk + blk - 1: n_full * blk: blk, :_MARK_DIMS] if n_full > keep else None
            self.computed_blocks += n_full - keep
            parts_f = [t for t in (old_f, new_f) if t is not None]
            parts_m = [t for t in (old_m, new_m) if t is not None]
            self.feats = torch.cat(parts_f, 2) if parts_f else None
            self.marks = torch.cat(parts_m, 2).clone() if parts_m else None
        if self.feats is None:
            return key_block_features(gate, key, 0, 0)
        return self.feats


def decode_cache(gate) -> DecodeGateCache:
    cache = getattr(gate, "_decode_cache", None)
    if cache is None:
        cache = DecodeGateCache()
        gate._decode_cache = cache
    return cache


def reset_decode_cache(gate) -> None:
    """Forget cached K features (a new sequence starts; the prefill path calls this)."""
    gate._decode_cache = None


def decode_gate_logits(gate, query: torch.Tensor, key: torch.Tensor, *, use_cache: bool = True) -> torch.Tensor:
    """Gate logits (B, H, 1, nKB) fp32 of the Sq decode queries over all ceil(Sk / block) key blocks (all are
    causal for the last query). ``use_cache=False`` recomputes every block's features (the reference)."""
    gate._check(query, key)
    blk = gate.config.block_size
    sk = key.shape[2]
    n_full = sk // blk
    kf = decode_cache(gate).features(gate, key) if use_cache else key_block_features(gate, key, 0, n_full)
    if sk % blk:
        kf = torch.cat([kf, key_block_features(gate, key, n_full, n_full + 1)], 2)
    qf = query_feature(gate, query, sk)
    b, h, hkv = query.shape[0], query.shape[1], key.shape[1]
    # GQA without repeating K features: the group's query heads become rows of one matmul per KV head.
    s = torch.matmul(qf.reshape(b, hkv, h // hkv, -1), kf.transpose(-1, -2))
    return s.reshape(b, h, 1, -1)


def decode_block_mask(gate, query: torch.Tensor, key: torch.Tensor, *, use_cache: bool = True) -> torch.Tensor:
    """Block mask (B, H, 1, nKB) bool for the decode queries: the prefill selection rule on one score row.

    ``config.decode == "sparse_kv"``: one choice per KV head, shared by its query heads — the rule applied to
    the group's mean gate probability — so the gather reads exactly the kept blocks (per-head choices read
    the union of the group's blocks, see :func:`sparse_decode_attention`)."""
    c = gate.config
    logits = decode_gate_logits(gate, query, key, use_cache=use_cache)
    scores = torch.softmax(logits, -1) if c.mode == "threshold" else logits
    groups = query.shape[1] // key.shape[1]
    if c.decode == "sparse_kv" and groups > 1:
        b, h, _, n = logits.shape
        scores = torch.softmax(logits, -1).reshape(b, h // groups, groups, 1, n).mean(2)
    mask = ref.select_block_mask(scores, mode=c.mode, threshold=c.threshold, top_k=c.top_k, sparsity=c.sparsity,
                                 block=c.block_size, sq=query.shape[2], sk=key.shape[2])
    return mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)


def _gather_blocks(x: torch.Tensor, idx: torch.Tensor, block: int) -> torch.Tensor:
    """Full blocks ``idx`` (B, Hkv, m) of ``x`` (B, Hkv, S, D) -> (B, Hkv, m * block, D), one copy.

    For a contiguous cache every block is one run of ``block * D`` elements, so an overlapping row view (one row
    per token start) lets a single ``index_select`` memcpy whole blocks (faster than advanced indexing;
    docs/seer_attention.md); other layouts take advanced indexing."""
    b, hkv, s, d = x.shape
    m = idx.shape[-1]
    if x.is_contiguous():
        rows = (torch.arange(b * hkv, device=x.device).view(b, hkv, 1) * s + idx * block).reshape(-1)
        runs = x.as_strided((x.numel() // d - block + 1, block * d), (d, 1))
        return torch.index_select(runs, 0, rows).view(b, hkv, m * block, d)
    n_full = s // block
    xb = x[:, :, :n_full * block].reshape(b, hkv, n_full, block, d)
    bi = torch.arange(b, device=x.device)[:, None, None]
    hi = torch.arange(hkv, device=x.device)[None, :, None]
    return xb[bi, hi, idx].reshape(b, hkv, m * block, d)


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                            *, scale: float | None = None, block: int = 64) -> torch.Tensor:
    """Attention of a few queries over the kept key blocks only; output (B, H, Sq, D) in ``query.dtype``.

    @query: (B, H, Sq, D), queries at positions Sk-Sq .. Sk-1 (causal); @key/@value: (B, Hkv, Sk, D);
    @block_mask: (B, H, 1, ceil(Sk / block)) bool, one row shared by the Sq queries; the last (partial or
    current) block must be kept. Equals ``attention_reference(q, k, v, block_mask=block_mask, block=block)``
    (fp32 softmax) while reading only kept blocks: full blocks are gathered once per KV head (the union of its
    query heads' choices), the partial last block is used in place.
    """
    groups = ref._check_qkv(query, key, value)
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    nkb = -(-sk // block)
    if sq > block or sq > sk or block_mask.shape != (b, h, 1, nkb):
        raise ValueError(f"sparse decode takes 1..block_size ({block}) queries (got {sq}) over {sk} keys and a block "
                         f"mask of shape {(b, h, 1, nkb)} (got {tuple(block_mask.shape)})")
    scale = d ** -0.5 if scale is None else scale
    n_full = sk // block
    qpos = torch.arange(sk - sq, sk, device=query.device)
    qg = query.reshape(b, hkv, groups * sq, d).float()  # rows: (head in group, query)
    head_mask = block_mask[:, :, 0].reshape(b, hkv, groups, nkb)
    scores, values = [], []
    union = head_mask[..., :n_full].any(2)  # (B, Hkv, n_full): blocks some head of the group keeps
    idx, cnt = ref.block_mask_to_indices(union[:, :, None])
    m = int(cnt.max()) if n_full else 0  # the one host sync: the gather width
    if m:
        idx = idx[:, :, 0, :m].long()  # (B, Hkv, m), ascending
        kg = _gather_blocks(key, idx, block).float()
        vg = _gather_blocks(value, idx, block).float()
        own = head_mask[..., :n_full].gather(-1, idx[:, :, None].expand(b, hkv, groups, m))  # (B,Hkv,g,m)
        own = own & (torch.arange(m, device=key.device) < cnt[:, :, 0, None, None])
        pos = (idx[..., None] * block + torch.arange(block, device=key.device)).reshape(b, hkv, 1, 1, m * block)
        ok = own.repeat_interleave(block, -1)[:, :, :, None, :] & (pos <= qpos[:, None])  # (B,Hkv,g,Sq,L)
        s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
        scores.append(s.masked_fill(~ok.reshape(b, hkv, groups * sq, m * block), float("-inf")))
        values.append(vg)
    if sk > n_full * block:  # the partial last block, used in place
        start = n_full * block
        kt, vt = key[:, :, start:].float(), value[:, :, start:].float()
        tpos = torch.arange(start, sk, device=key.device)
        ok = (tpos[None, :] <= qpos[:, None]).repeat(groups, 1)  # (g*Sq, t)
        last = head_mask[..., -1].repeat_interleave(sq, -1)[..., None]  # (B, Hkv, g*Sq, 1)
        s = torch.matmul(qg, kt.transpose(-1, -2)) * scale
        scores.append(s.masked_fill(~(ok & last), float("-inf")))
        values.append(vt)
    if not scores:  # nothing kept at all: rows attending nothing give zeros, as attention_reference does
        return torch.zeros_like(query)
    p = torch.softmax(torch.cat(scores, -1), -1).nan_to_num(0.0)
    out = 0
    at = 0
    for v_part in values:
        n = v_part.shape[2]
        out = out + torch.matmul(p[..., at:at + n], v_part)
        at += n
    return out.reshape(b, h, sq, d).to(query.dtype)


def sparse_decode_applies(query: torch.Tensor, key: torch.Tensor, token_mask: torch.Tensor | None, causal: bool,
                          block: int) -> bool:
    """Whether the sparse decode path serves this call: causal, 1 <= Sq <= block, Sq < Sk, and no mask beyond
    the plain causal one (padded batches, sliding windows and static caches' unfilled tail go dense)."""
    sq, sk = query.shape[2], key.shape[2]
    if not causal or not 1 <= sq <= block or sq >= sk:
        return False
    if token_mask is None:
        return True
    tm = token_mask[..., -sk:]
    return bool(torch.equal(tm, ref.causal_token_mask(sq, sk, tm.device).expand_as(tm)))


def seer_decode_attention(gate, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                          scale: float | None = None, use_cache: bool = True) -> torch.Tensor:
    """Gate-selected sparse attention for decode queries: (B, H, Sq, D) in ``query.dtype``."""
    with torch.no_grad():
        mask = decode_block_mask(gate, query, key, use_cache=use_cache)
        return sparse_decode_attention(query, key, value, mask, scale=scale, block=gate.config.block_size)
