"""Pre-gates: in MoE layer i, a router-shaped map from layer i's input to layer i+1's routing.

Life cycle: :func:`add_pregates` (initialised from the next layer's router, i.e. the training-free next-gate
predictor) → :func:`distill_pregates` (top-k distillation: imitate layer i+1's router from layer i's input, on the
model's own hidden states) → :func:`train_pregates` (end to end through ``Trainer`` with pre-gated routing executed,
only pre-gate weights trained) → :func:`save_pregates` / :func:`load_pregates` (safetensors + versioned JSON beside
the model). Each pre-gate is a copy of the next router's module, so its outputs (logits, scores, indices) follow
the model's own routing rule (softmax, top-k, renormalisation).
"""
from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PregateConfig
from .layers import MoELayer, find_moe_layers
from .routing import enable_pregated_routing

logger = logging.getLogger(__name__)
WEIGHTS_NAME = "pregates.safetensors"
CONFIG_NAME = "pregate_config.json"


def add_pregates(model: nn.Module) -> PregateConfig:
    """Attach ``block.pregate`` to every MoE block but the last, each a copy of the next block's router."""
    layers = find_moe_layers(model)
    for cur, nxt in zip(layers, layers[1:]):
        gate = copy.deepcopy(nxt.router)
        for p in gate.parameters():
            p.requires_grad_(True)
        cur.block.pregate = gate
    return PregateConfig(num_experts=layers[0].num_experts, hidden_size=int(layers[0].router.weight.shape[1]),
                         layers=tuple(l.index for l in layers[:-1]))


def _pregated(layers: list[MoELayer]) -> list[MoELayer]:
    out = [l for l in layers[:-1] if getattr(l.block, "pregate", None) is not None]
    if len(out) != len(layers) - 1:
        raise ValueError("the model has no pre-gates; call add_pregates(model) or load_pregates(model, path) first")
    return out


def pregate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for l in _pregated(find_moe_layers(model)) for p in l.block.pregate.parameters()]


def save_pregates(model: nn.Module, path: str | Path) -> Path:
    """Write ``pregates.safetensors`` and ``pregate_config.json`` under ``path``."""
    from safetensors.torch import save_file

    layers = find_moe_layers(model)
    pre = _pregated(layers)
    cfg = PregateConfig(num_experts=layers[0].num_experts, hidden_size=int(layers[0].router.weight.shape[1]),
                        layers=tuple(l.index for l in pre))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{l.index}.{k}": v.detach().contiguous().cpu()
               for l in pre for k, v in l.block.pregate.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "hf_efficient.pregates"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def load_pregates(model: nn.Module, path: str | Path) -> PregateConfig:
    """Attach pre-gates saved by :func:`save_pregates`; raises ``ValueError`` if they do not fit the model."""
    from safetensors.torch import load_file

    src = Path(path)
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise ValueError(f"{src} holds no pre-gates (need {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = PregateConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
    layers = find_moe_layers(model)
    want = (layers[0].num_experts, int(layers[0].router.weight.shape[1]), tuple(l.index for l in layers[:-1]))
    if (cfg.num_experts, cfg.hidden_size, cfg.layers) != want:
        raise ValueError(f"pre-gates in {src} are for (num_experts, hidden_size, layers)="
                         f"{(cfg.num_experts, cfg.hidden_size, cfg.layers)}, the model has {want}")
    add_pregates(model)
    tensors = load_file(str(src / WEIGHTS_NAME))
    for l in layers[:-1]:
        sd = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"layers.{l.index}.")}
        ref = l.block.pregate.weight
        l.block.pregate.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in sd.items()}, strict=True)
    return cfg


@contextmanager
def _router_inputs(layers: list[MoELayer]):
    """Collect each router's input (detached) for one forward pass."""
    store: dict[int, torch.Tensor] = {}
    handles = [l.router.register_forward_hook(
        lambda m, a, o, pos=l.position: store.__setitem__(pos, a[0].detach().reshape(-1, a[0].shape[-1])))
        for l in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _topk_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    # Cross-entropy of the student on the teacher's top-k experts, weighted by the teacher's renormalised top-k
    # probabilities: only the experts that will be fetched matter, not the order of the tail.
    top = torch.topk(torch.softmax(teacher_logits.float(), -1), k, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True)
    logp = torch.log_softmax(student_logits.float(), -1).gather(-1, top.indices)
    return -(w * logp).sum(-1).mean()


def distill_pregates(model: nn.Module, batches: Iterable[torch.Tensor], steps: int = 100, lr: float = 1e-3,
                     progress: bool = True) -> list[float]:
    """Top-k distillation: train each pre-gate to predict the next router's top-k from its own layer's input.

    ``batches``: input-id tensors (B, T) or (T,). The model runs once per batch with its own routing (no
    substitution) to collect every router's input; the pre-gates then take ``steps`` Adam steps on those cached
    states, one batch per step, cycling (the states do not depend on the pre-gates, so one forward per batch
    suffices). Only pre-gate weights change. Returns the loss per step."""
    layers = find_moe_layers(model)
    pre = _pregated(layers)
    batches = list(batches)
    if not batches:
        raise ValueError("distill_pregates: batches is empty")
    device = layers[0].router.weight.device
    cached = []
    with torch.no_grad():
        for ids in tqdm(batches, desc="router inputs", disable=not progress):
            with _router_inputs(layers) as h:
                model(input_ids=ids.reshape(-1, ids.shape[-1]).to(device))
            # Teacher logits now, so the steps below touch only the pre-gates.
            cached.append([(h[l.position],
                            nn.functional.linear(h[l.position + 1], layers[l.position + 1].router.weight))
                           for l in pre])
    opt = torch.optim.Adam(pregate_parameters(model), lr=lr)
    losses = []
    for step in tqdm(range(steps), desc="distil pre-gates", disable=not progress):
        feats = cached[step % len(cached)]
        loss = sum(_topk_distill_loss(l.block.pregate(x)[0], teacher, layers[l.position + 1].top_k)
                   for l, (x, teacher) in zip(pre, feats)) / len(pre)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def pregate_recall(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Token-level recall at k of layer i+1's true top-k experts, for the pre-gates and the next-router predictor.

    Recall at k = |predicted top-k ∩ true top-k| / k, averaged over tokens and layers, the model's own routing
    running (so both predictors see the same hidden states)."""
    layers = find_moe_layers(model)
    pre = _pregated(layers)
    hit = {"pregate": 0, "next_router": 0}
    total = 0
    for ids in batches:
        with _router_inputs(layers) as h:
            model(input_ids=ids.reshape(-1, ids.shape[-1]).to(layers[0].router.weight.device))
        for l in pre:
            nxt = layers[l.position + 1]
            truth = torch.topk(nn.functional.linear(h[nxt.position], nxt.router.weight), nxt.top_k, -1).indices
            for name, logits in (("pregate", l.block.pregate(h[l.position])[0]),
                                 ("next_router", nn.functional.linear(h[l.position], nxt.router.weight))):
                pred = torch.topk(logits, nxt.top_k, -1).indices
                hit[name] += int((pred.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).sum())
            total += truth.numel()
    return {k: v / total for k, v in hit.items()}


def train_pregates(model: nn.Module, train_dataset, args, data_collator=None, callbacks=None):
    """End-to-end pre-gate training through ``transformers.Trainer`` with pre-gated routing executed.

    Every parameter but the pre-gates is frozen for the run (restored afterwards). ``train_dataset`` yields dicts
    with ``input_ids`` and ``labels``; ``args`` is a ``TrainingArguments``. Returns ``Trainer.train()``'s output.
    Not compatible with gradient checkpointing (a recomputed layer would miss its pre-gated routing)."""
    from transformers import Trainer

    pre_ids = {id(p) for p in pregate_parameters(model)}
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in pre_ids)
    hooks = enable_pregated_routing(model)
    try:
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                          callbacks=callbacks)
        return trainer.train()
    finally:
        hooks.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, True))
