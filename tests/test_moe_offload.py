"""Expert offloading: exactness against the non-offloaded model, accounting, budget errors, buffer protocol."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MixtralConfig, OlmoeConfig, Qwen2MoeConfig

from hf_efficient.moe import (OffloadConfig, PregatedOffload, add_pregates, enable_pregated_offload,
                              enable_pregated_routing, find_moe_layers)
from hf_efficient.moe.cache import SimulatedAsyncCopier

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(intermediate_size=40, num_local_experts=8, num_experts_per_tok=2, **COMMON),
    "qwen2_moe": lambda: Qwen2MoeConfig(moe_intermediate_size=40, intermediate_size=64, num_experts=8,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                        decoder_sparse_step=1, **COMMON),
    "olmoe": lambda: OlmoeConfig(intermediate_size=40, num_experts=8, num_experts_per_tok=3, **COMMON),
}
EXACT_MODES = ["on_demand", "lru", "prefetch_all", "speculative"]


def tiny(name: str, device="cpu", dtype=torch.float32):
    torch.manual_seed(1)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=dtype)
    m.eval().set_experts_implementation("eager")
    return m


def budget_for(model, slots_per_layer):
    layers = find_moe_layers(model)
    return slots_per_layer * len(layers) * layers[0].expert_bytes / 2**30


@torch.no_grad()
def run(model, ids, steps=3):
    """Prefill ``ids`` then ``steps`` decode steps on a KV cache; all logits."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {name: DynamicCache(config=model.config), "use_cache": True}
    out = [model(input_ids=ids, **kv).logits]
    tok = out[-1][:, -1:].argmax(-1)
    for _ in range(steps):
        out.append(model(input_ids=tok, **kv).logits)
        tok = out[-1][:, -1:].argmax(-1)
    return out


def offload(model, mode, slots, **kw):
    return PregatedOffload(model, OffloadConfig(gpu_budget_gb=budget_for(model, slots), mode=mode),
                           copier="simulated", fill=float("nan"), **kw)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_vs_not_offloaded(name, mode, ids):
    # 3 slots per layer < the experts a 9-token prefill uses, so prefill runs in chunks; decode fits in one.
    model = tiny(name)
    ref = run(model, ids)
    off = offload(model, mode, slots=3)
    got = run(model, ids)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)
    assert off.stats.misses > 0 and off.copier.landed > 0
    if mode == "on_demand":
        assert off.stats.hits == 0
    if mode in ("speculative", "prefetch_all"):
        assert off.stats.recall is not None and off.stats.prefetch_bytes > 0
    else:
        assert off.stats.recall is None and off.stats.prefetch_bytes == 0


def test_instance_forward_fallback_exact(ids):
    model = tiny("mixtral")
    ref = run(model, ids)
    off = offload(model, "speculative", slots=2, use_experts_interface=False)
    assert model.config._experts_implementation == "eager"
    assert all(torch.equal(r, g) for r, g in zip(ref, run(model, ids)))
    off.disable()
    assert "forward" not in find_moe_layers(model)[0].experts.__dict__


def test_pregated_mode_follows_pregates(ids):
    model = tiny("olmoe")
    add_pregates(model)
    with torch.no_grad():  # make the pre-gates differ from the next routers, so the routing visibly changes
        for l in find_moe_layers(model)[:-1]:
            l.block.pregate.weight.add_(torch.randn_like(l.block.pregate.weight))
    own = run(model, ids)
    hooks = enable_pregated_routing(model)
    ref = run(model, ids)
    hooks.remove()
    assert not torch.equal(own[0], ref[0])
    off = offload(model, "pregated", slots=3)
    got = run(model, ids)
    assert all(torch.equal(r, g) for r, g in zip(ref, got))
    assert off.stats.recall == 1.0 and off.stats.wasted_bytes == 0


def test_prefetch_all_accounting_one_token():
    model = tiny("mixtral")
    layers = find_moe_layers(model)
    L, E, k, b = len(layers), layers[0].num_experts, layers[0].top_k, layers[0].expert_bytes
    off = offload(model, "prefetch_all", slots=E)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]))
    s = off.stats
    # Layer 0 has no prediction (k misses); every later layer finds its k experts among the E prefetched ones.
    assert (s.misses, s.hits) == (k, (L - 1) * k)
    assert s.demand_bytes == k * b and s.prefetch_bytes == (L - 1) * E * b
    assert s.wasted_bytes == (L - 1) * (E - k) * b
    assert s.recall == 1.0 and s.used_with_prediction == (L - 1) * k and s.tokens == 1


def test_lru_full_budget_second_pass_copies_nothing(ids):
    model = tiny("qwen2_moe")
    off = offload(model, "lru", slots=8)
    with torch.no_grad():
        model(input_ids=ids)
        off.reset_stats()
        model(input_ids=ids)
    assert off.stats.bytes_copied == 0 and off.stats.hit_rate == 1.0


def test_hits_and_misses_cover_every_used_expert(ids):
    model = tiny("olmoe")
    used = []
    layers = find_moe_layers(model)
    hs = [l.router.register_forward_hook(lambda m, a, o: used.append(int(torch.unique(o[2]).numel())))
          for l in layers]
    off = offload(model, "speculative", slots=4)
    run(model, ids, steps=2)
    for h in hs:
        h.remove()
    s = off.stats
    assert s.hits + s.misses == sum(used)
    assert s.demand_bytes == s.misses * layers[0].expert_bytes
    assert s.layer_calls == len(used)


def test_reading_without_waiting_is_caught(ids, monkeypatch):
    # The harness must be able to fail: skip the wait and the stale (NaN) slots reach the output.
    model = tiny("mixtral")
    ref = run(model, ids, steps=1)
    monkeypatch.setattr(SimulatedAsyncCopier, "wait", lambda self, slot: None)
    offload(model, "speculative", slots=3)
    got = run(model, ids, steps=1)
    assert not all(torch.equal(r, g) for r, g in zip(ref, got))


def test_copy_into_slot_in_use_raises():
    c = SimulatedAsyncCopier(2)
    dst, src = (torch.zeros(2),), (torch.ones(2),)
    c.copy(0, dst, src)
    c.wait(0)
    assert torch.equal(dst[0], src[0])
    c.copy(0, dst, (torch.full((2,), 2.0),))
    with pytest.raises(RuntimeError, match="slot 0"):
        c.synchronize()


def test_budget_errors_and_respected():
    model = tiny("mixtral")
    layers = find_moe_layers(model)
    with pytest.raises(ValueError, match="gpu_budget_gb"):
        enable_pregated_offload(model, gpu_budget_gb=budget_for(model, 1), mode="lru")
    with pytest.raises(ValueError, match="gpu_budget_gb"):
        OffloadConfig(gpu_budget_gb=0)
    with pytest.raises(ValueError, match="mode"):
        OffloadConfig(mode="psychic")
    budget = budget_for(model, 3.5)
    off = enable_pregated_offload(model, gpu_budget_gb=budget, mode="lru")
    assert off.slots_per_layer == 3 and off.gpu_bytes() <= budget * 2**30
    with pytest.raises(ValueError, match="already enabled"):
        enable_pregated_offload(model, gpu_budget_gb=budget)
    with pytest.raises(ValueError, match="mode"):
        off.set_mode("nope")
    big = enable_pregated_offload(tiny("olmoe"), gpu_budget_gb=1.0)  # more than all experts: capped
    assert big.slots_per_layer == find_moe_layers(big.model)[0].num_experts
    with pytest.raises(ValueError, match="no sparse-MoE block"):
        find_moe_layers(torch.nn.Linear(2, 2))
    assert layers[0].top_k == 2


def test_disable_restores(ids):
    model = tiny("mixtral")
    ref = run(model, ids, steps=1)
    off = enable_pregated_offload(model, gpu_budget_gb=budget_for(model, 2), mode="speculative")
    assert model.config._experts_implementation == "hf_efficient_offload"
    off.disable()
    assert model.config._experts_implementation == "eager"
    assert all(torch.equal(r, g) for r, g in zip(ref, run(model, ids, steps=1)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["on_demand", "lru", "speculative"])
def test_cuda_streams_exact(mode, dtype, ids):
    model = tiny("olmoe", device="cuda", dtype=dtype)
    ids = ids.cuda()
    ref = run(model, ids)
    off = enable_pregated_offload(model, gpu_budget_gb=budget_for(model, 3), mode=mode)
    assert off.copier.__class__.__name__ == "CudaCopier"
    assert find_moe_layers(model)[0].experts.gate_up_proj.is_pinned()
    got = run(model, ids)
    assert all(torch.equal(r, g) for r, g in zip(ref, got))
    assert off.gpu_bytes() <= budget_for(model, 3) * 2**30
