"""Router hooks: predict (and, for pre-gated routing, decide) the experts of the next MoE layer from this one.

One forward hook per router. The hook of MoE layer i sees the router's input h_i (the MoE block's input) and
runs a *predictor* for layer i+1 on it:

* ``"next_router"`` — layer i+1's own router weights applied to h_i (training-free, the speculative predictor),
* ``"pregate"`` — the pre-gate module ``block_i.pregate`` (see :mod:`hf_efficient.moe.pregate`),
* ``"all"`` — every expert of layer i+1 (prefetch-all baseline).

With ``substitute=True`` the prediction *is* layer i+1's routing: layer i+1's router output is replaced by the
pre-gate's (logits, scores, indices), as in Pre-gated MoE. The first MoE layer keeps its own router.
PyTorch module hooks (not accelerate hooks) because they are removed one by one through their handles, leaving
any accelerate ``device_map`` hook on the same module in place.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layers import MoELayer, find_moe_layers

PREDICTORS = ("next_router", "pregate", "all")


def predicted_experts(indices: torch.Tensor, num_experts: int) -> list[int]:
    """Experts named in ``indices`` (any shape), most-voted first (ties: lower index first)."""
    votes = torch.bincount(indices.reshape(-1).to(torch.int64), minlength=num_experts)[:num_experts]
    order = torch.argsort(votes, descending=True, stable=True)
    return [e for e, v in zip(order.tolist(), votes[order].tolist()) if v > 0]


class RouterHooks:
    """Installs the hooks; ``on_predict(position, experts)`` receives each prediction (most-voted first)."""

    def __init__(self, model: nn.Module, predictor: str, substitute: bool = False,
                 on_predict: Callable[[int, list[int]], None] | None = None, layers: list[MoELayer] | None = None):
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor={predictor!r} is invalid; allowed: {PREDICTORS}")
        if substitute and predictor != "pregate":
            raise ValueError("substitute=True needs predictor='pregate' (only a pre-gate may choose the routing)")
        self.layers = layers or find_moe_layers(model)
        if predictor == "pregate":
            missing = [l.name for l in self.layers[:-1] if getattr(l.block, "pregate", None) is None]
            if missing:
                raise ValueError(f"predictor='pregate' but {missing} have no pre-gate; call "
                                 f"hf_efficient.moe.add_pregates(model) or load_pregates(model, path) first")
        self.predictor, self.substitute, self.on_predict = predictor, substitute, on_predict
        self._pending: list[tuple | None] = [None] * len(self.layers)
        self._handles = [l.router.register_forward_hook(self._hook(l)) for l in self.layers]

    def _predict(self, layer: MoELayer, h: torch.Tensor):
        nxt = self.layers[layer.position + 1]
        if self.predictor == "pregate":
            return layer.block.pregate(h)
        if self.predictor == "next_router":
            # Top-k of the logits equals top-k of the router's probabilities (softmax is monotonic); calling the
            # router module itself would re-enter its hook.
            logits = nn.functional.linear(h.reshape(-1, nxt.router.weight.shape[1]), nxt.router.weight)
            return logits, None, torch.topk(logits, nxt.top_k, dim=-1).indices
        return None, None, torch.arange(nxt.num_experts, device=h.device)

    def _hook(self, layer: MoELayer):
        def hook(module, args, output):
            pos = layer.position
            if self.substitute and self._pending[pos] is not None:
                output, self._pending[pos] = self._pending[pos], None
            if pos + 1 < len(self.layers):
                pred = self._predict(layer, args[0])
                if self.substitute:
                    self._pending[pos + 1] = pred
                if self.on_predict is not None:
                    with torch.no_grad():
                        self.on_predict(pos + 1, predicted_experts(pred[2], self.layers[pos + 1].num_experts))
            return output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = [None] * len(self.layers)


def enable_pregated_routing(model: nn.Module) -> RouterHooks:
    """Route every MoE layer after the first by the previous layer's pre-gate (no offloading). ``.remove()`` undoes."""
    return RouterHooks(model, predictor="pregate", substitute=True)
