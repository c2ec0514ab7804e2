"""``attn_implementation="seer_attention"``: the attention function transformers calls in every layer.

Prefill (query length == key length, no cache before it): the layer's :class:`AttnGate` scores key
blocks, :func:`select_blocks` turns scores into a block mask, and the block-sparse kernel (Triton on
CUDA, the plain-torch twin on CPU) attends to the kept blocks only. A padding mask (left or right padding)
is honoured exactly: the gate ignores padded keys and attention runs through the masked reference path.
Decode and chunked prefill after a cache (query length != key length) run dense attention (SDPA, exact)
unless ``config.decode`` is ``"sparse"`` / ``"sparse_kv"``: then up to ``block_size`` queries on an
unpadded cache run the gate-selected sparse decode of :mod:`.decode` (longer chunks and padded batches stay
dense). A layer without a gate raises instead of silently running dense.
"""
from __future__ import annotations

import torch

from ...kernels import seer_reference as ref
from .decode import reset_decode_cache, seer_decode_attention, sparse_decode_applies
from .gate import AttnGate, select_blocks

NAME = "seer_attention"
GATE_ATTR = "seer_gate"


class MissingGateError(RuntimeError):
    pass


def attention_modules(model) -> list:
    """The model's attention modules in layer order (Llama/Qwen2/Mistral-style: ``layer_idx``,
    ``num_key_value_groups``, ``head_dim``)."""
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention modules (with layer_idx, "
                         f"num_key_value_groups, head_dim); SeerAttention supports Llama/Qwen2/Mistral-style models")
    return sorted(mods, key=lambda m: m.layer_idx)


def _gate(module) -> AttnGate:
    gate = getattr(module, GATE_ATTR, None)
    if gate is None:
        raise MissingGateError(
            f"attn_implementation='seer_attention' but layer {getattr(module, 'layer_idx', '?')} has no trained "
            f"AttnGate: load gates with hf_efficient.attention.seer.load_gates(model, path) or train them with "
            f"`hf-efficient train-gate` / hf_efficient.attention.seer.train_gates (SeerAttention never falls back "
            f"to dense attention silently)")
    return gate


def _key_valid(attention_mask: torch.Tensor | None, sk: int) -> torch.Tensor | None:
    """(B, Sk) bool of keys some query may see, from transformers' (B, 1, Sq, Sk) mask (None = all)."""
    if attention_mask is None:
        return None
    m = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(
        attention_mask.dtype).min / 2
    return m[..., -sk:].any(dim=-2)[:, 0] if m.dim() == 4 else m


def _token_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _kl(pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over query blocks of KL(pooled || softmax(logits)), fp32; forbidden blocks contribute 0."""
    logp = torch.log_softmax(logits, dim=-1)
    terms = torch.where(pooled > 0, pooled * (torch.log(pooled.clamp_min(1e-30)) - logp), 0.0)
    rows = pooled.sum(-1) > 0
    return terms.sum(-1)[rows].mean() if rows.any() else logits.sum() * 0.0


def seer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, H, D), None)."""
    gate = _gate(module)
    if dropout:
        raise ValueError(f"seer_attention does not implement attention dropout (got dropout={dropout}); put the "
                         f"model in eval mode (gate training keeps the base model frozen in eval mode)")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    sq, sk = query.shape[2], key.shape[2]
    blk = gate.config.block_size
    if sq != sk:
        # Decode / chunked prefill on top of a cache: gate-selected sparse decode when asked and applicable,
        # else exact dense attention.
        if gate.config.decode != "dense" and gate.capture is None and sparse_decode_applies(
                query, key, _token_mask(attention_mask), causal, blk):
            return seer_decode_attention(gate, query, key, value, scale=scale).transpose(1, 2), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale,
                                      **kwargs)
    reset_decode_cache(gate)  # a prefill starts a new sequence: cached decode features are stale
    key_valid = _key_valid(attention_mask, sk)
    token_mask = _token_mask(attention_mask)
    if gate.capture == "distill":
        # Self-distillation: dense output (the model runs unchanged) + the pooled map as the gate's target.
        with torch.no_grad():
            if token_mask is None:
                out, pooled = torch.ops.hf_efficient.seer_pooled_attention(query, key, value, causal, scale, blk)
            else:
                p = ref.attention_probs(query, key, causal=causal, scale=scale, token_mask=token_mask)
                g = query.shape[1] // key.shape[1]
                out = torch.matmul(p, value.float().repeat_interleave(g, 1)).to(query.dtype)
                pooled = ref.row_normalize(ref.block_max_pool(p, blk))
        with torch.enable_grad():
            gate.records.append(_kl(pooled, gate.logits(query.detach(), key.detach(), key_valid)))
        return out.transpose(1, 2), None
    with torch.no_grad():
        if key_valid is None:
            # Fused gate on CUDA (a few launches, writes the kernel's block indices directly).
            kv_idx, kv_cnt = gate.block_indices(query, key)
            block_mask = None
        else:
            block_mask = select_blocks(gate(query, key, key_valid), gate.config, sq, sk)
    if gate.capture == "recall":
        if block_mask is None:
            block_mask = ref.indices_to_block_mask(kv_idx, kv_cnt, -(-sk // blk))
        p = ref.attention_probs(query, key, causal=causal, scale=scale, token_mask=token_mask)
        kept = (p * ref.expand_block_mask(block_mask, sq, sk, blk)).sum(-1)
        rows = p.sum(-1) > 0
        causal_blocks = ref.causal_block_mask(sq, sk, blk, query.device)
        gate.records.append({"recall": kept[rows].mean().item(),
                             "density": (block_mask.sum() / (causal_blocks.sum() * block_mask.shape[0]
                                                             * block_mask.shape[1])).item()})
    if token_mask is not None:  # padding (key_valid set, so block_mask too): exact masked path
        out = ref.attention_reference(query, key, value, causal=causal, scale=scale, block_mask=block_mask,
                                      block=blk, token_mask=token_mask)
        return out.transpose(1, 2), None
    if block_mask is not None:
        kv_idx, kv_cnt = ref.block_mask_to_indices(block_mask)
    out = torch.ops.hf_efficient.seer_sparse_attention(query, key, value, kv_idx, kv_cnt, causal, scale, blk)
    return out.transpose(1, 2), None
