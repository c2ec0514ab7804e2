"""Pre-gates: initialisation, top-k distillation, end-to-end Trainer run, safetensors round trip."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, TrainingArguments

from hf_efficient.moe import (PregateConfig, add_pregates, distill_pregates, enable_pregated_routing,
                              find_moe_layers, load_pregates, pregate_recall, save_pregates, train_pregates)

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)


def tiny():
    torch.manual_seed(2)
    m = AutoModelForCausalLM.from_config(MixtralConfig(**CFG))
    m.set_experts_implementation("eager")
    return m


def batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def test_init_is_the_next_router_predictor():
    m = tiny().eval()
    cfg = add_pregates(m)
    layers = find_moe_layers(m)
    assert cfg.layers == (0, 1) and cfg.num_experts == 8
    for cur, nxt in zip(layers, layers[1:]):
        assert torch.equal(cur.block.pregate.weight, nxt.router.weight)
        assert cur.block.pregate.weight.data_ptr() != nxt.router.weight.data_ptr()
    r = pregate_recall(m, batches(1))
    assert r["pregate"] == r["next_router"] and 0 < r["pregate"] <= 1


def test_distillation_beats_the_training_free_predictor():
    m = tiny().eval()
    add_pregates(m)
    data = batches()
    before = pregate_recall(m, data)
    router_before = [l.router.weight.clone() for l in find_moe_layers(m)]
    losses = distill_pregates(m, data, steps=60, lr=2e-2, progress=False)
    after = pregate_recall(m, data)
    assert losses[-1] < losses[0]
    assert after["pregate"] > before["next_router"]
    assert after["next_router"] == before["next_router"]  # the model itself did not change
    assert all(torch.equal(a, l.router.weight) for a, l in zip(router_before, find_moe_layers(m)))


def test_pregated_routing_changes_only_later_layers():
    m = tiny().eval()
    add_pregates(m)
    seen = {}
    layers = find_moe_layers(m)
    hs = [l.experts.register_forward_hook(lambda mod, a, o, i=l.position: seen.__setitem__(i, a[1].clone()))
          for l in layers]
    ids = batches(1)[0]
    with torch.no_grad():
        m(input_ids=ids)
        own = dict(seen)
        with torch.no_grad():
            layers[0].block.pregate.weight.mul_(-1)  # a pre-gate that disagrees with the next router
        hooks = enable_pregated_routing(m)
        m(input_ids=ids)
        hooks.remove()
    for h in hs:
        h.remove()
    assert torch.equal(own[0], seen[0])          # the first MoE layer keeps its own router
    assert not torch.equal(own[1], seen[1])      # layer 1 follows layer 0's pre-gate


def test_train_pregates_with_trainer_changes_only_pregates(tmp_path):
    m = tiny()
    add_pregates(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ds = [{"input_ids": ids, "labels": ids} for ids in batches(4)[0].split(1) * 2]
    ds = [{k: v[0] for k, v in d.items()} for d in ds]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=5e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    out = train_pregates(m, ds, args)
    assert out.global_step == 3
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".pregate." in n for n in changed)
    assert all(p.requires_grad for p in m.parameters())  # restored
    assert all(not l.router._forward_hooks for l in find_moe_layers(m))  # routing hooks removed


def test_save_load_round_trip_and_errors(tmp_path):
    m = tiny()
    add_pregates(m)
    with torch.no_grad():
        for l in find_moe_layers(m)[:-1]:
            l.block.pregate.weight.normal_()
    save_pregates(m, tmp_path)
    saved = json.loads((tmp_path / "pregate_config.json").read_text())
    assert saved["format_version"] == 1
    m2 = tiny()
    cfg = load_pregates(m2, tmp_path)
    assert isinstance(cfg, PregateConfig)
    for a, b in zip(find_moe_layers(m)[:-1], find_moe_layers(m2)[:-1]):
        assert torch.equal(a.block.pregate.weight, b.block.pregate.weight)
    with pytest.raises(ValueError, match="holds no pre-gates"):
        load_pregates(m2, tmp_path / "nothing")
    (tmp_path / "pregate_config.json").write_text(json.dumps({**saved, "format_version": 9}))
    with pytest.raises(ValueError, match="format_version"):
        load_pregates(m2, tmp_path)
    (tmp_path / "pregate_config.json").write_text(json.dumps({**saved, "num_experts": 4}))
    with pytest.raises(ValueError, match="num_experts"):
        load_pregates(m2, tmp_path)
    with pytest.raises(ValueError, match="no pre-gates"):
        save_pregates(tiny(), tmp_path / "x")
