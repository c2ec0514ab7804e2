"""MoEfication: a real (small) MoE made from a dense SwiGLU model, for quality measurements of pre-gating.

Each FFN's intermediate neurons are split into ``num_experts`` equal groups by balanced k-means on their
[gate; up] weight rows (neurons that read similar input directions go together, as in MoEfication, Zhang et al.
2022); a linear router per layer is fitted by least squares to predict each group's output norm from the FFN input
on calibration tokens. The result is a ``MixtralForCausalLM`` (attention, norms and embeddings copied unchanged).

Mixtral renormalises the top-k routing weights to sum to 1, while the dense FFN is the plain *sum* of its neuron
groups; so each expert's ``down_proj`` is multiplied by ``top_k`` and the router's logits are kept small
(``router_scale``), which makes every chosen expert's weight close to 1/top_k and the MoE output close to the sum
of the chosen groups. With ``top_k == num_experts`` and a zero router the MoE computes the dense FFN exactly.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def balanced_clusters(rows: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Assign each of the ``n`` rows of ``rows`` (n, d) to one of ``k`` clusters of exactly n/k rows (cosine k-means
    with a greedy capacity-limited assignment). Returns cluster ids (n,)."""
    n = rows.shape[0]
    if n % k:
        raise ValueError(f"num_experts={k} must divide the FFN width {n}")
    if iters < 1:
        raise ValueError(f"iters={iters} is invalid; allowed: >= 1")
    cap = n // k
    x = nn.functional.normalize(rows.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]]
    for _ in range(iters):
        score = x @ centroids.T                                   # (n, k)
        order = torch.argsort(score.reshape(-1), descending=True).tolist()
        assign, count = [-1] * n, [0] * k
        for flat in order:                                        # greedy: best (neuron, cluster) pairs first
            i, c = divmod(flat, k)
            if assign[i] < 0 and count[c] < cap:
                assign[i] = c
                count[c] += 1
        assign_t = torch.tensor(assign)
        centroids = nn.functional.normalize(
            torch.stack([x[assign_t == c].mean(0) for c in range(k)]), dim=-1)
    return assign_t


@torch.no_grad()
def moefy(dense: nn.Module, num_experts: int = 16, top_k: int = 4, calib_ids: torch.Tensor | None = None,
          router_scale: float = 0.05, progress: bool = True):
    """A ``MixtralForCausalLM`` with ``num_experts`` experts per layer (top-``top_k``) built from the Llama-style
    ``dense`` model (``mlp.gate_proj/up_proj/down_proj``, no MLP bias).

    ``calib_ids`` (B, T): tokens whose FFN inputs fit the routers; without them the routers are zero (every expert
    equally likely; useful only with ``top_k == num_experts``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    if getattr(c, "mlp_bias", False):
        raise ValueError("moefy: dense MLPs with bias are not supported")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is invalid; allowed: 1..num_experts={num_experts}")
    inter = c.intermediate_size
    if inter % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide intermediate_size={inter}")
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=inter // num_experts,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_parameters=getattr(c, "rope_parameters", None),
                        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=num_experts,
                        num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0)
    dtype = next(dense.parameters()).dtype
    moe = MixtralForCausalLM(cfg).to(dtype)
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise ValueError(f"moefy: dense weights do not map onto Mixtral: unexpected {unexpected}, missing "
                         f"{[k for k in missing if '.mlp.' not in k]}")
    inputs = _ffn_inputs(dense, calib_ids) if calib_ids is not None else None
    layers = list(zip(dense.model.layers, moe.model.layers))
    for i, (dl, ml) in enumerate(tqdm(layers, desc="moefy", disable=not progress)):
        wg, wu, wd = dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight, dl.mlp.down_proj.weight
        assign = balanced_clusters(torch.cat([wg, wu], dim=1), num_experts, seed=i)
        groups = [torch.nonzero(assign == e)[:, 0] for e in range(num_experts)]
        ex = ml.mlp.experts
        for e, idx in enumerate(groups):
            ex.gate_up_proj[e] = torch.cat([wg[idx], wu[idx]], dim=0)
            ex.down_proj[e] = wd[:, idx] * top_k
        router = ml.mlp.gate.weight
        router.zero_()
        if inputs is not None:
            x = inputs[i]
            act = dl.mlp.act_fn(x @ wg.T) * (x @ wu.T)                       # (N, inter)
            target = torch.stack([(act[:, idx] @ wd[:, idx].T).norm(dim=-1) for idx in groups], dim=1)
            target = target - target.mean(1, keepdim=True)
            sol = torch.linalg.lstsq(x.double(), target.double()).solution.T  # (E, H)
            scores = x.double() @ sol.T
            router.copy_((sol * router_scale / scores.std().clamp_min(1e-12)).to(router.dtype))
    return moe.eval()


def _ffn_inputs(dense: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    store: dict[int, list] = {}
    hooks = [l.mlp.register_forward_hook(
        lambda m, a, o, i=i: store.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for i, l in enumerate(dense.model.layers)]
    try:
        for row in ids:
            dense(input_ids=row[None].to(next(dense.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(store[i]) for i in range(len(dense.model.layers))]
