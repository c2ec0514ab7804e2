"""Expert offloading with next-layer prediction and prefetch (Pre-gated MoE, Hwang et al., ISCA 2024).

``enable_pregated_offload(model, gpu_budget_gb=..., mode=...)`` after a normal ``from_pretrained`` moves every
expert weight of every sparse-MoE block to (page-locked) host memory and installs

* an experts implementation (transformers' ``ExpertsInterface`` where the model uses it, else an instance
  ``forward``) that runs each layer's experts from the device cache of :mod:`hf_efficient.moe.cache`, fetching
  misses on demand, and
* router hooks (:mod:`hf_efficient.moe.routing`) that predict layer i+1's experts while layer i runs, so their
  copies overlap layer i's compute.

The experts are computed with the same operations, in the same order, as transformers' eager experts forward, so
``on_demand``, ``lru``, ``prefetch_all`` and ``speculative`` give outputs identical to the model without offload
(eager); ``pregated`` follows the pre-gates' routing instead. Inference only: expert weights get no gradients.
"""
from __future__ import annotations

import logging
import types
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .cache import ExpertCache, make_copier
from .config import MODES, OffloadConfig
from .layers import MoELayer, find_moe_layers
from .routing import RouterHooks

logger = logging.getLogger(__name__)
EXPERTS_IMPLEMENTATION = "hf_efficient_offload"
_PREDICTOR = {"prefetch_all": "all", "speculative": "next_router", "pregated": "pregate"}


@dataclass
class OffloadStats:
    tokens: int = 0              # tokens through the first MoE layer (prefill and decode)
    layer_calls: int = 0
    hits: int = 0                # experts found in the device cache when their layer ran (prefetched ones included)
    misses: int = 0              # experts copied on demand, on the critical path
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    wasted_bytes: int = 0        # prefetched for a layer that then did not use them
    predicted_used: int = 0      # experts a layer used that its prediction named
    used_with_prediction: int = 0  # experts used by layers that had a prediction

    @property
    def recall(self) -> float | None:
        return self.predicted_used / self.used_with_prediction if self.used_with_prediction else None

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    @property
    def bytes_copied(self) -> int:
        return self.demand_bytes + self.prefetch_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "recall": self.recall, "hit_rate": self.hit_rate, "bytes_copied": self.bytes_copied}


def eager_experts_forward(experts: nn.Module, hidden_states, top_k_index, top_k_weights, weights_of):
    """transformers' eager experts loop, reading expert ``e``'s (gate_up, down) from ``weights_of(e)``.

    ``weights_of`` is called once per used expert, in ascending expert order, and may return device copies."""
    num_experts = experts.gate_up_proj.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        used = [e for e in torch.unique(top_k_index).tolist() if e < num_experts]
    for e, (gu, dn) in zip(used, weights_of(used)):
        top_k_pos, token_idx = torch.where(mask[e])
        gate, up = nn.functional.linear(hidden_states[token_idx], gu).chunk(2, dim=-1)
        cur = nn.functional.linear(experts.act_fn(gate) * up, dn)
        cur = cur * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, cur.to(final.dtype))
    return final


def _offloaded_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    state = getattr(self, "_hfe_offload", None)
    if state is None:  # an experts module of another model sharing the implementation name
        original = type(self).forward
        return getattr(original, "__wrapped__", original)(self, hidden_states, top_k_index, top_k_weights)
    engine, position = state
    return engine.run_layer(position, self, hidden_states, top_k_index, top_k_weights)


def _register_experts_implementation() -> bool:
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    if ExpertsInterface._global_mapping.get(EXPERTS_IMPLEMENTATION) is not _offloaded_experts_forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _offloaded_experts_forward)
    return True


class PregatedOffload:
    """What :func:`enable_pregated_offload` returns: ``stats``, ``reset_stats()``, ``set_mode()``, ``disable()``."""

    def __init__(self, model: nn.Module, config: OffloadConfig, copier: str = "auto", fill: float | None = None,
                 use_experts_interface: bool | None = None):
        self.model, self.config = model, config
        self.layers: list[MoELayer] = find_moe_layers(model)
        if any(getattr(l.experts, "_hfe_offload", None) for l in self.layers):
            raise ValueError("expert offload is already enabled on this model; call .disable() on its handle first")
        first = self.layers[0]
        self.device = torch.device(config.device) if config.device else first.router.weight.device
        self.expert_bytes = first.expert_bytes
        n_layers, n_exp, top_k = len(self.layers), first.num_experts, max(l.top_k for l in self.layers)
        budget = int(config.gpu_budget_gb * 2**30)
        per_layer = min(budget // (self.expert_bytes * n_layers), n_exp)
        if per_layer < top_k:
            need = top_k * n_layers * self.expert_bytes / 2**30
            raise ValueError(f"gpu_budget_gb={config.gpu_budget_gb} holds {budget // self.expert_bytes} experts of "
                             f"{self.expert_bytes / 2**20:.1f} MiB, fewer than top_k={top_k} for each of the "
                             f"{n_layers} MoE layers; allowed: gpu_budget_gb >= {need:.4g}")
        self.slots_per_layer = int(per_layer)
        pin = config.pin_memory if config.pin_memory is not None else self.device.type == "cuda"
        self._device_weights = [l.experts.gate_up_proj.device for l in self.layers]
        host = []
        for l in self.layers:
            pair = []
            for p in (l.experts.gate_up_proj, l.experts.down_proj):
                h = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                h.copy_(p.data)
                p.data = h  # the parameter now lives on the host; the device only ever holds cache slots
                pair.append(h)
            host.append(tuple(pair))
        if pin:
            torch.cuda.empty_cache()
        self._fill = fill
        self.copier = make_copier(copier, n_layers * self.slots_per_layer, self.device)
        self.cache = ExpertCache(host, self.slots_per_layer, self.device, self.copier, fill=fill)
        self.stats = OffloadStats()
        self._predicted: list[list[int] | None] = [None] * n_layers
        self._prefetched: list[set[int]] = [set() for _ in range(n_layers)]
        self._hooks: RouterHooks | None = None
        if use_experts_interface is None:
            use_experts_interface = (hasattr(model, "set_experts_implementation")
                                     and hasattr(type(first.experts).forward, "__wrapped__")
                                     and _register_experts_implementation())
        self._old_impl = None
        if use_experts_interface:
            self._old_impl = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") \
                else model.config._experts_implementation
            model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        for l in self.layers:
            l.experts._hfe_offload = (self, l.position)
            if not use_experts_interface:
                l.experts.forward = types.MethodType(_offloaded_experts_forward, l.experts)
        self.set_mode(config.mode)

    # ---- control -------------------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """Switch prediction mode; empties the cache so measurements of different modes start alike."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid; allowed: {MODES}")
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self.copier.synchronize()
        self._clear_cache()
        self.mode = mode
        self._predicted = [None] * len(self.layers)
        self._prefetched = [set() for _ in self.layers]
        if mode in _PREDICTOR:
            self._hooks = RouterHooks(self.model, _PREDICTOR[mode], substitute=mode == "pregated",
                                      on_predict=self._on_predict, layers=self.layers)

    def _clear_cache(self) -> None:
        c = self.cache
        for l in range(len(c.resident)):
            c.resident[l].clear()
            c.free[l] = list(range(l * c.slots_per_layer, (l + 1) * c.slots_per_layer))[::-1]
        c.pinned.clear()
        if self._fill is not None:  # tests: stale slots hold NaN, so reading a slot before its copy lands shows
            for t in c.pool:
                t.fill_(self._fill)

    def reset_stats(self) -> None:
        self.stats = OffloadStats()

    def gpu_bytes(self) -> int:
        """Device bytes held by the expert cache."""
        return sum(t.numel() * t.element_size() for t in self.cache.pool)

    def disable(self) -> None:
        """Remove the hooks and put the expert weights back on the device they came from."""
        if self._hooks is not None:
            self._hooks.remove()
        self.copier.synchronize()
        for l, dev in zip(self.layers, self._device_weights):
            for p in (l.experts.gate_up_proj, l.experts.down_proj):
                p.data = p.data.to(dev)
            del l.experts._hfe_offload
            if "forward" in l.experts.__dict__:
                del l.experts.forward
        if self._old_impl is not None:
            self.model.set_experts_implementation(self._old_impl)
        self.cache = None

    # ---- the work ------------------------------------------------------------------------------------------
    def _on_predict(self, position: int, experts: list[int]) -> None:
        self._predicted[position] = experts

    def _prefetch(self, position: int) -> None:
        pred = self._predicted[position] if position < len(self.layers) else None
        if pred:
            copied = self.cache.prefetch(position, pred)
            self._prefetched[position].update(copied)
            self.stats.prefetch_bytes += len(copied) * self.expert_bytes

    def _account(self, position: int, used: list[int]) -> None:
        pred = self._predicted[position]
        if pred is not None:
            used_set = set(used)
            self.stats.predicted_used += len(used_set.intersection(pred))
            self.stats.used_with_prediction += len(used_set)
            self.stats.wasted_bytes += len(self._prefetched[position] - used_set) * self.expert_bytes
        self._predicted[position] = None
        self._prefetched[position] = set()

    def run_layer(self, position: int, experts: nn.Module, hidden_states, top_k_index, top_k_weights):
        if position == 0:
            self.stats.tokens += hidden_states.shape[0]
        self.stats.layer_calls += 1
        cache, step = self.cache, self.slots_per_layer
        held: list[int] = []
        started = []

        def weights_of(used):
            started.append(True)
            self._account(position, used)
            for start in range(0, len(used), step):
                chunk = used[start:start + step]
                slots, missed = cache.acquire(position, chunk)
                self.stats.hits += len(chunk) - len(missed)
                self.stats.misses += len(missed)
                self.stats.demand_bytes += len(missed) * self.expert_bytes
                if start + step >= len(used):  # after this layer's demand copies, ahead of its compute
                    self._prefetch(position + 1)
                held[:] = slots
                for s in slots:
                    self.copier.wait(s)
                    yield cache.slot_tensors(s)
                cache.release(slots)
                held.clear()

        try:
            out = eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights, weights_of)
        finally:
            if held:
                cache.release(held)
        if not started:  # no token routed here (empty batch): still account and keep the pipeline going
            self._account(position, [])
            self._prefetch(position + 1)
        if self.mode == "on_demand":
            cache.drop(position)
        return out


def enable_pregated_offload(model: nn.Module, gpu_budget_gb: float = 4.0, mode: str = "speculative", *,
                            device: str | torch.device | None = None, pin_memory: bool | None = None,
                            copier: str = "auto", config: OffloadConfig | None = None) -> PregatedOffload:
    """Offload the experts of ``model``'s sparse-MoE blocks to host memory, caching ``gpu_budget_gb`` GiB of them on
    the device and prefetching by ``mode`` (see :data:`hf_efficient.moe.config.MODES`).

    Call after the model is on its device; do not move the model afterwards. ``copier``: 'auto' (CUDA stream
    copies on CUDA, else synchronous), 'cuda', 'sync', or 'simulated' (CPU stand-in that exposes reads of in-flight
    buffers). Raises ``ValueError`` for a budget below ``top_k`` experts per MoE layer or a model without MoE blocks.

    >>> off = enable_pregated_offload(model, gpu_budget_gb=2, mode="speculative")
    >>> model.generate(**inputs); print(off.stats.recall, off.stats.bytes_copied)
    """
    cfg = config or OffloadConfig(gpu_budget_gb=gpu_budget_gb, mode=mode,
                                  device=str(device) if device is not None else None, pin_memory=pin_memory)
    return PregatedOffload(model, cfg, copier=copier)
