"""SeerAttention integration: gate, block selection, attn_implementation, padding, decode, IO, training, CLI."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

import hf_efficient  # noqa: F401  (registers seer_attention)
from hf_efficient.attention.seer import (AttnGate, MissingGateError, SeerAttentionConfig, attach_gates,
                                         attention_modules, configure, gates_of, load_gates, save_gates,
                                         select_blocks, train_gates)
from hf_efficient.kernels import seer_reference as R

CFG = SeerAttentionConfig(block_size=16, gate_dim=16, sparsity=0.0)


@pytest.fixture()
def model(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    m.set_attn_implementation("sdpa")
    return m


def _ids(b=2, s=150, seed=0):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("field,value", [("block_size", 48), ("gate_dim", 7), ("mode", "random"),
                                         ("sparsity", 1.0), ("top_k", 0), ("threshold", 2.0),
                                         ("format_version", 9)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SeerAttentionConfig(**{field: value})


def test_selection_cannot_change_architecture():
    with pytest.raises(ValueError, match="block_size"):
        CFG.with_selection(block_size=32)


def test_no_gates_is_a_clear_error(model):
    model.set_attn_implementation("seer_attention")
    with pytest.raises(MissingGateError, match="no trained AttnGate"):
        model(_ids())


@pytest.mark.parametrize("sel", [dict(mode="sparsity", sparsity=0.0), dict(mode="topk", top_k=1000),
                                 dict(mode="threshold", threshold=0.0)])
def test_keep_everything_equals_dense(model, sel):
    ids = _ids()
    dense = model(ids).logits
    attach_gates(model, CFG.with_selection(**sel))
    torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_sparse_matches_masked_reference(model):
    """The model's sparse attention equals dense attention restricted to the gate's own block mask."""
    attach_gates(model, CFG.with_selection(sparsity=0.6))
    mod = attention_modules(model)[0]
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    from hf_efficient.attention.seer.attention import seer_attention_forward

    out, _ = seer_attention_forward(mod, q, k, v, None, scaling=0.25)
    bm = select_blocks(mod.seer_gate(q, k), mod.seer_gate.config, 100, 100)
    assert bm.float().mean() < R.causal_block_mask(100, 100, 16).float().mean()  # something was skipped
    ref = R.attention_reference(q, k, v, scale=0.25, block_mask=bm, block=16)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_select_blocks_rules():
    torch.manual_seed(0)
    sq = 16 * 20 - 5
    scores = torch.randn(1, 2, 20, 20)
    causal = R.causal_block_mask(sq, sq, 16)
    for sp in (0.5, 0.9):
        m = select_blocks(scores, CFG.with_selection(sparsity=sp), sq, sq)
        assert not (m & ~causal).any()
        assert m[..., 0].all() and m.diagonal(dim1=-2, dim2=-1).all()
        budget = torch.ceil(causal.sum(-1) * (1 - sp) - 1e-6)
        assert (m.sum(-1) <= budget + 2).all() and (m.sum(-1) >= budget).all()
    m = select_blocks(scores, CFG.with_selection(mode="topk", top_k=3), sq, sq)
    assert (m.sum(-1) <= 5).all() and (m.sum(-1) == torch.clamp(causal.sum(-1), max=3)).sum() > 0
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    m = select_blocks(probs, CFG.with_selection(mode="threshold", threshold=0.2), sq, sq)
    free = causal & ~torch.eye(20, dtype=torch.bool) & (torch.arange(20) > 0)  # not forced either way
    assert torch.equal(m[..., free], (probs >= 0.2)[..., free])


def test_gate_shapes_and_gqa_errors():
    gate = AttnGate(4, 2, 16, CFG)
    p = gate(torch.randn(2, 4, 70, 16), torch.randn(2, 2, 70, 16))
    assert p.shape == (2, 4, 5, 5)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 5))
    assert (p[..., ~R.causal_block_mask(70, 70, 16)] == 0).all()
    with pytest.raises(ValueError, match="kv heads"):
        gate(torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16))


def test_padding_is_honoured(model):
    """Left-padded rows give the logits of the same text unpadded (dense-equivalent selection)."""
    pad = 37
    ids = _ids(2, 120)
    attach_gates(model, CFG)
    alone = model(ids[:1, pad:]).logits
    am = torch.ones_like(ids)
    am[0, :pad] = 0
    batched = model(ids, attention_mask=am).logits
    torch.testing.assert_close(batched[0, pad:], alone[0], atol=1e-4, rtol=1e-4)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(batched[am.bool()], model(ids, attention_mask=am).logits[am.bool()],
                               atol=1e-5, rtol=1e-5)


def test_sparse_with_padding_never_reads_padded_keys(model):
    from hf_efficient.attention.seer.attention import seer_attention_forward
    from transformers.masking_utils import sdpa_mask

    attach_gates(model, CFG.with_selection(sparsity=0.5))
    mod = attention_modules(model)[0]
    am = torch.ones(2, 90, dtype=torch.bool)
    am[0, :21] = False
    mask = sdpa_mask(batch_size=2, q_length=90, kv_length=90, attention_mask=am, allow_is_causal_skip=False)
    q, k, v = torch.randn(2, 4, 90, 16), torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    out, _ = seer_attention_forward(mod, q, k, v, mask, scaling=0.25)
    bm = select_blocks(mod.seer_gate(q, k, am), mod.seer_gate.config, 90, 90)
    ref = R.attention_reference(q, k, v, scale=0.25, block_mask=bm, block=16, token_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :21] = 1e3 * torch.randn(2, 21, 16)
    v2[0, :, :21] = 1e3
    out2, _ = seer_attention_forward(mod, q, k2, v2, mask, scaling=0.25)
    torch.testing.assert_close(out2[0, 21:], out[0, 21:])  # padded keys change neither gate nor attention


def test_generate_uses_dense_decode(model):
    ids = _ids(1, 40)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    attach_gates(model, CFG)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=8, do_sample=False), ref)
    configure(model, sparsity=0.9)
    assert model.generate(ids, max_new_tokens=8, do_sample=False).shape == ref.shape


def test_save_load(model, tmp_path):
    ids = _ids(1, 100)
    attach_gates(model, CFG.with_selection(sparsity=0.5), seed=3)
    out = model(ids).logits
    save_gates(model, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "seer_config.json").read_text())
    assert meta["num_layers"] == 2 and meta["format_version"] == 1
    other = copy.deepcopy(model)
    for m in attention_modules(other):
        del m.seer_gate
    other.set_attn_implementation("sdpa")
    cfg = load_gates(other, tmp_path / "g")
    assert cfg.sparsity == 0.5 and other.config._attn_implementation == "seer_attention"
    torch.testing.assert_close(other(ids).logits, out)
    assert load_gates(other, tmp_path / "g", sparsity=0.8).sparsity == 0.8


def test_load_errors(model, tmp_path):
    from hf_efficient.attention.seer.io import CONFIG_NAME
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    attach_gates(model, CFG)
    save_gates(model, tmp_path)
    with pytest.raises(ValueError, match="layers"):
        load_gates(LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)), tmp_path)
    with pytest.raises(ValueError, match="kv heads"):
        load_gates(LlamaForCausalLM(tiny_llama_config(num_key_value_heads=4)), tmp_path)
    with pytest.raises(FileNotFoundError, match="no SeerAttention gate config"):
        load_gates(model, tmp_path / "nowhere")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        load_gates(model, tmp_path)


def test_training_updates_only_gates_and_resumes(model, tmp_path):
    base = {k: v.clone() for k, v in model.state_dict().items() if "seer_gate" not in k}
    ids = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    kw = dict(config=CFG, seq_len=128, steps=4, lr=5e-2, progress=False)
    straight = copy.deepcopy(model)
    hist = train_gates(straight, ids, **kw)
    assert len(hist) == 4 and all(h >= 0 for h in hist)
    after = {k: v for k, v in straight.state_dict().items() if "seer_gate" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)
    init = attach_gates(copy.deepcopy(model), CFG, set_implementation=False)[0].q_weight
    assert not torch.equal(gates_of(straight)[0].q_weight, init)
    # interrupted after 2 steps, then resumed from the checkpoint: same trajectory
    part = copy.deepcopy(model)
    h1 = train_gates(part, ids, **kw, checkpoint_dir=tmp_path, save_every=2)
    resumed = copy.deepcopy(model)
    shutil.rmtree(tmp_path / "checkpoint-4")
    h2 = train_gates(resumed, ids, config=None, seq_len=128, steps=4, lr=5e-2, progress=False,
                     checkpoint_dir=tmp_path, save_every=2)
    assert h2[:2] == h1[:2]
    torch.testing.assert_close(torch.tensor(h2), torch.tensor(h1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gates_of(resumed)[1].k_weight, gates_of(part)[1].k_weight, atol=1e-6, rtol=1e-5)


def test_gate_learns_a_peaked_map():
    """The distillation objective is learnable: on a fixed peaked attention map, KL falls several-fold."""
    from hf_efficient.attention.seer.attention import _kl

    g = torch.Generator().manual_seed(0)
    q, k = 3 * torch.randn(1, 4, 128, 16, generator=g), 3 * torch.randn(1, 2, 128, 16, generator=g)
    target = R.row_normalize(R.block_max_pool(R.attention_probs(q, k), 16))
    gate = AttnGate(4, 2, 16, CFG)
    opt = torch.optim.Adam(gate.parameters(), lr=3e-2)
    losses = []
    for _ in range(60):
        loss = _kl(target, gate.logits(q, k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert _kl(target, torch.log(target)).item() == pytest.approx(0.0, abs=1e-6)


def test_recall_is_one_when_nothing_is_skipped(model):
    from hf_efficient.attention.seer.training import attention_recall

    attach_gates(model, CFG)
    r = attention_recall(model, _ids(2, 100))
    assert r["recall"] == pytest.approx(1.0, abs=1e-5) and r["density"] == pytest.approx(1.0)
    configure(model, sparsity=0.7)
    r = attention_recall(model, _ids(2, 100))
    assert 0 < r["recall"] < 1 and r["density"] < 0.7


def test_train_gate_cli(tiny_llama_dir, tmp_path):
    out = tmp_path / "gates"
    cmd = [sys.executable, "-m", "hf_efficient.cli", "train-gate", "--model", str(tiny_llama_dir), "--out", str(out),
           "--steps", "2", "--seq-len", "64", "--block-size", "16", "--gate-dim", "16", "--max-tokens", "3000",
           "--save-every", "1", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "seer_gates.safetensors").is_file() and (out / "checkpoints" / "checkpoint-2").is_dir()
    bad = subprocess.run(cmd[:-2] + ["--sparsity", "1.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "fraction" in bad.stderr


def test_pool_fast_path_equals_masked_path():
    from hf_efficient.attention.seer.gate import pool_blocks

    x = torch.randn(2, 3, 64, 8)
    kinds = ("max", "min", "avg")
    torch.testing.assert_close(pool_blocks(x, 16, kinds=kinds),
                               pool_blocks(x, 16, torch.ones(2, 64, dtype=torch.bool), kinds=kinds))


@pytest.mark.gpu
def test_gpu_model_uses_fused_gate(model, monkeypatch):
    """On CUDA, attn_implementation="seer_attention" scores blocks with the fused Triton gate, and the model's
    logits match the CPU run (plain-torch twin of the same gates)."""
    from hf_efficient.kernels import seer_gate

    cfg = SeerAttentionConfig(block_size=16, gate_dim=32, sparsity=0.6)
    attach_gates(model, cfg)
    ids = _ids(1, 150)
    cpu_logits = model(ids).logits
    calls = []
    real = seer_gate.gate_block_indices
    monkeypatch.setattr(seer_gate, "gate_block_indices", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gpu = model.to("cuda")
    out = gpu(ids.cuda()).logits.cpu()
    assert len(calls) == len(attention_modules(gpu))
    torch.testing.assert_close(out, cpu_logits, atol=2e-3, rtol=2e-3)


def test_sink_local_baseline_of_the_quality_benchmark():
    """The benchmark's trivial rule: each query block keeps the first key block and its most recent ones, with the
    same budget as SeerAttention's 'sparsity' mode (keep_counts), and attends exactly over them."""
    import math

    from benchmarks.seer_quality import _BASELINE, sink_local_attention
    from hf_efficient.kernels import seer_reference as ref

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    _BASELINE.update(sparsity=0.6, block=64)
    out, _ = sink_local_attention(None, q, k, v, None)
    nb = math.ceil(300 / 64)
    mask = torch.zeros(1, 4, nb, nb, dtype=torch.bool)
    for i in range(nb):
        n = ref.keep_counts(i + 1, "sparsity", 1, 0.6, nb)
        assert n < i + 1 or i < 2  # the rule really skips blocks in the later rows
        mask[..., i, max(0, i - n + 1):i + 1] = True
        mask[..., i, 0] = True
    want = ref.attention_reference(q, k, v, block_mask=mask, block=64).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unpadded prefill"):
        sink_local_attention(None, q[:, :, :1], k, v, None)
