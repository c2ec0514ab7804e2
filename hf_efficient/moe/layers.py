"""Finding the sparse-MoE blocks of a transformers model, whatever the architecture.

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (transformers >= 5) share one shape: a block with a ``gate``
router (``weight`` (E, H), ``top_k``; ``forward(h) -> (logits, scores, indices)``) and an ``experts``
module holding ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I). Anything with that shape works.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoELayer:
    """One sparse-MoE block: ``index`` is its decoder-layer number, ``position`` its rank among MoE blocks."""

    name: str
    index: int
    position: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def expert_bytes(self) -> int:
        e = self.experts
        return (e.gate_up_proj[0].numel() * e.gate_up_proj.element_size()
                + e.down_proj[0].numel() * e.down_proj.element_size())


def _is_moe_block(m: nn.Module) -> bool:
    gate, experts = getattr(m, "gate", None), getattr(m, "experts", None)
    if gate is None or experts is None:
        return False
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    w = getattr(gate, "weight", None)
    return (gu is not None and dn is not None and w is not None and gu.dim() == 3 and dn.dim() == 3
            and hasattr(gate, "top_k") and w.dim() == 2 and w.shape[0] == gu.shape[0])


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse-MoE block of ``model`` in forward order.

    Raises ``ValueError`` when there is none, or when an experts module uses a layout the offload
    path does not implement (bias, transposed or interleaved weights, post-expert norm).
    """
    found = []
    for name, m in model.named_modules():
        if not _is_moe_block(m):
            continue
        hit = _LAYER_INDEX.search(name + ".")
        idx = int(hit.group(1)) if hit else len(found)
        e = m.experts
        for flag, bad in (("has_bias", True), ("is_transposed", True), ("is_concatenated", False),
                          ("has_gate", False), ("has_post_expert_norm", True)):
            if getattr(e, flag, not bad) == bad:
                raise ValueError(f"{name}.experts has {flag}={bad}: only concatenated [gate; up] projections without "
                                 f"bias in (E, out, in) layout are supported")
        found.append(MoELayer(name, idx, len(found), m, m.gate, e))
    if not found:
        raise ValueError(f"{type(model).__name__} has no sparse-MoE block (a module with a `gate` router and "
                         f"`experts` holding 3-D gate_up_proj/down_proj); supported: Mixtral, Qwen2-MoE, Qwen3-MoE, "
                         f"OLMoE and models of the same shape")
    found.sort(key=lambda l: l.index)
    for pos, layer in enumerate(found):
        layer.position = pos
    shapes = {(tuple(l.experts.gate_up_proj.shape[1:]), tuple(l.experts.down_proj.shape[1:])) for l in found}
    if len(shapes) != 1:
        raise ValueError(f"MoE layers have different expert shapes {sorted(shapes)}; the offload cache needs one shape")
    return found
