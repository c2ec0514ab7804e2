"""AdamA: equivalence with AdamW (N = 1), the hand-written rule (N > 1), checkpoints, edge cases."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from hf_efficient.optim import AdamA
from tests.adama_reference import RefAdamA, batches, close, micro_grads, mlp


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model, opt, data, n):
    for s in range(len(data) // n):
        for x, y in data[s * n:(s + 1) * n]:
            ((model(x) - y).pow(2).mean() / n).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_micro_batch_equals_adamw(weight_decay):
    a, b = mlp(), mlp()
    groups = lambda m: [{"params": [m[0].weight, m[2].weight]},  # noqa: E731
                        {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0, "lr": 3e-3}]
    opt_a = AdamA(groups(a), lr=1e-2, weight_decay=weight_decay)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, weight_decay=weight_decay)
    data = batches(0, 8)
    _train(a, opt_a, data, 1)
    _train(b, opt_b, data, 1)
    assert close(list(a.parameters()), list(b.parameters()), rtol=1e-5, atol=1e-6)
    assert not close(list(a.parameters()), list(mlp().parameters()))  # it did train


@pytest.mark.parametrize("n", [2, 4])
def test_several_micro_batches_match_reference(n):
    model, probe = mlp(), mlp()
    opt = AdamA(model.parameters(), lr=1e-2, weight_decay=0.05, accumulation_steps=n)
    ref = RefAdamA(list(model.parameters()), lr=1e-2, weight_decay=0.05, n=n)
    data = batches(1, 5 * n)
    for s in range(5):
        chunk = data[s * n:(s + 1) * n]
        ref.step(micro_grads(probe, chunk, n, params=[p.float() for p in ref.params]))
        for x, y in chunk:
            ((model(x) - y).pow(2).mean() / n).backward()
            assert all(p.grad is None for p in model.parameters())  # folded and freed in backward
        opt.step()
    assert close(list(model.parameters()), ref.params, rtol=1e-5, atol=1e-6)


def test_differs_from_adamw_by_second_moment_only():
    """With N > 1, m equals AdamW's exactly and v is >= AdamW's (variance between micro-batches)."""
    n = 4
    a, b = mlp(), mlp()
    opt_a = AdamA(a.parameters(), lr=1e-2, accumulation_steps=n)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for x, y in batches(2, n):
        ((a(x) - y).pow(2).mean() / n).backward()
        ((b(x) - y).pow(2).mean() / n).backward()
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-8)
        assert bool((sa["exp_avg_sq"] >= sb["exp_avg_sq"] * (1 - 1e-5)).all())
        assert float(sa["exp_avg_sq"].sum()) > float(sb["exp_avg_sq"].sum())


def test_gradients_never_coexist():
    """During backward at most one parameter holds a gradient at a time (hooks free it at once)."""
    model = mlp()
    params = list(model.parameters())
    opt = AdamA(params, lr=1e-3)  # noqa: F841 - hooks hold it weakly, so keep it alive
    live = []
    for p in params:  # registered after AdamA's hooks, so it observes p after the fold
        p.register_post_accumulate_grad_hook(lambda _p: live.append(sum(q.grad is not None for q in params)))
    x, y = batches(3, 1)[0]
    (model(x) - y).pow(2).mean().backward()
    assert live and max(live) == 0


def test_bf16_params_keep_fp32_states_and_track_reference():
    model = mlp().to(torch.bfloat16)
    probe = mlp().to(torch.bfloat16)  # no hooks: gradients for the reference
    opt = AdamA(model.parameters(), lr=1e-2, weight_decay=0.0, accumulation_steps=2)
    ref = RefAdamA(list(model.parameters()), lr=1e-2, n=2)
    data = [(x.bfloat16(), y.bfloat16()) for x, y in batches(4, 6)]
    for s in range(3):
        chunk = data[2 * s:2 * s + 2]
        ref.step(micro_grads(probe, chunk, 2, params=list(model.parameters())))  # AdamA's bf16 gradients
        for x, y in chunk:
            ((model(x) - y).pow(2).mean() / 2).backward()
        opt.step()
        # keep the reference on the bf16 grid like the parameters (the update is rounded to bf16)
        ref.params = [q.to(torch.bfloat16).double() for q in ref.params]
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16
    assert close(list(model.parameters()), ref.params, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("state_bits,dtype", [(32, torch.float32), (32, torch.bfloat16), (16, torch.float32),
                                              (8, torch.float32)])
def test_state_dict_round_trip_resumes_exactly(state_bits, dtype):
    n, kw = 2, dict(lr=1e-2, weight_decay=0.01, state_bits=state_bits, min_8bit_size=64, block_size=64)
    data = batches(5, 12)
    full = mlp().to(dtype)
    opt = AdamA(full.parameters(), accumulation_steps=n, **kw)
    _train(full, opt, [(x.to(dtype), y.to(dtype)) for x, y in data], n)

    first = mlp().to(dtype)
    opt1 = AdamA(first.parameters(), accumulation_steps=n, **kw)
    _train(first, opt1, [(x.to(dtype), y.to(dtype)) for x, y in data[:6]], n)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # what Trainer does: no pickled classes needed
    second = mlp(seed=99).to(dtype)
    second.load_state_dict(ck["model"])
    opt2 = AdamA(second.parameters(), accumulation_steps=n, **kw)
    opt2.load_state_dict(ck["opt"])
    for p in second.parameters():
        st = opt2.state[p]
        if state_bits in (32, 16):
            assert st["exp_avg"].dtype == (torch.float32 if state_bits == 32 else torch.bfloat16)
    _train(second, opt2, [(x.to(dtype), y.to(dtype)) for x, y in data[6:]], n)
    for a, b in zip(full.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_load_rejects_foreign_state_dict():
    model = mlp()
    sd = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not an AdamA"):
        AdamA(model.parameters()).load_state_dict(sd)


def test_parameters_without_grads_and_frozen_are_untouched():
    model = mlp()
    unused = torch.nn.Parameter(torch.randn(5))
    model[2].bias.requires_grad_(False)
    before_unused, before_frozen = unused.detach().clone(), model[2].bias.detach().clone()
    opt = AdamA(list(model.parameters()) + [unused], lr=1e-2, weight_decay=0.1)
    _train(model, opt, batches(6, 3), 1)
    assert torch.equal(unused, before_unused) and unused not in opt.state
    assert torch.equal(model[2].bias, before_frozen) and model[2].bias not in opt.state
    assert opt.state[model[0].weight]["step"].item() == 3


def test_parameter_with_grads_in_some_steps_only():
    """A parameter skipped by a whole step keeps its states and step count, as with AdamW."""
    a, b = mlp(), mlp()
    opt_a, opt_b = AdamA(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(batches(7, 4)):
        for model, opt in ((a, opt_a), (b, opt_b)):
            out = model[0](x)[:, :16] if i % 2 else model(x)  # odd steps do not reach the second layer
            (out - y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert close(list(a.parameters()), list(b.parameters()), rtol=1e-5, atol=1e-6)
    assert opt_a.state[a[2].weight]["step"].item() == 2


def test_sparse_gradients_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamA(emb.parameters())  # noqa: F841
    with pytest.raises(RuntimeError, match="sparse gradients"):
        emb(torch.tensor([1, 2])).sum().backward()


def test_per_param_clip_matches_reference():
    n, clip = 2, 0.05
    model, probe = mlp(), mlp()
    opt = AdamA(model.parameters(), lr=1e-2, weight_decay=0.0, accumulation_steps=n, per_param_clip=clip)
    ref = RefAdamA(list(model.parameters()), lr=1e-2, n=n, clip=clip)
    data = batches(8, 3 * n)
    for s in range(3):
        chunk = data[s * n:(s + 1) * n]
        ref.step(micro_grads(probe, chunk, n, params=[p.float() for p in ref.params]))
        for x, y in chunk:
            ((model(x) - y).pow(2).mean() / n).backward()
        opt.step()
    assert close(list(model.parameters()), ref.params, rtol=1e-5, atol=1e-6)


def test_fold_without_hooks_needs_fold_grads():
    n = 2
    model, twin = mlp(), mlp()
    opt = AdamA(model.parameters(), lr=1e-2, accumulation_steps=n, fold_on_hook=False)
    data = batches(9, n)
    for x, y in data:
        ((model(x) - y).pow(2).mean() / n).backward()
    with pytest.raises(RuntimeError, match="fold_grads"):
        opt.step()
    opt.zero_grad()
    opt_twin = AdamA(twin.parameters(), lr=1e-2, accumulation_steps=n)
    for x, y in data:
        ((model(x) - y).pow(2).mean() / n).backward()
        assert model[0].weight.grad is not None
        opt.fold_grads()
        ((twin(x) - y).pow(2).mean() / n).backward()
    opt.step()
    opt_twin.step()
    assert close(list(model.parameters()), list(twin.parameters()), rtol=1e-6, atol=1e-7)


def test_grad_norm_tracking_equals_global_norm_for_one_micro_batch():
    model, twin = mlp(), mlp()
    opt = AdamA(model.parameters(), track_grad_norm=True)
    x, y = batches(10, 1)[0]
    (model(x) - y).pow(2).mean().backward()
    (twin(x) - y).pow(2).mean().backward()
    expect = float(torch.nn.utils.clip_grad_norm_(twin.parameters(), float("inf")))
    assert opt.pop_grad_norm() == pytest.approx(expect, rel=1e-5)
    assert opt.pop_grad_norm() is None


def test_dropped_optimizer_releases_model():
    model = mlp()
    opt = AdamA(model.parameters())
    opt.remove_hooks()
    x, y = batches(11, 1)[0]
    (model(x) - y).pow(2).mean().backward()
    assert model[0].weight.grad is not None  # no hook: gradients stay for step()
    opt.step()
    assert model[0].weight.grad is None  # step() consumes them


@pytest.mark.parametrize("kwargs,field", [
    (dict(betas=(0.9, 1.0)), "betas"), (dict(lr=-1.0), "lr"), (dict(state_bits=4), "state_bits"),
    (dict(accumulation_steps=0), "accumulation_steps"), (dict(per_param_clip=0.0), "per_param_clip"),
    (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(block_size=0), "block_size"),
    (dict(impl="cuda"), "impl"), (dict(bucket_mb=-1), "bucket_mb"),
])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdamA(mlp().parameters(), **kwargs)


def test_deepcopy_model_after_optimizer():
    model = mlp()
    AdamA(model.parameters())
    copy.deepcopy(model)  # hooks hold only a weak reference to the optimizer
