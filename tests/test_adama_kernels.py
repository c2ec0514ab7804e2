"""AdamA's multi-tensor fold and update (Triton under TRITON_INTERPRET=1 on CPU, torch foreach) against
the one-tensor-at-a-time reference; bf16 states (nearest and stochastic rounding); the optimizer's buckets."""
from __future__ import annotations

import pytest
import torch

from hf_efficient.kernels import adama_foreach, adama_reference
from hf_efficient.optim import AdamA
from tests.adama_reference import RefAdamA, batches, close, micro_grads, mlp

pytestmark = pytest.mark.usefixtures("one_thread")

# Triton runs on the GPU where there is one, else under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
# The interpreter does the kernels' fp32 arithmetic exactly like torch; the GPU contracts to FMAs.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = DEV == "cpu"

# sizes: below, at and across the Triton block (2048), a scalar, a 2-D tensor
SHAPES = [(3000,), (7, 5), (1,), (2048,), (2049,)]
FIRSTS = [True, False, True, False, True]
SCALES = [1.0, 0.5, 1.0, 2.0, 0.25]


def _triton():
    pytest.importorskip("triton")
    from hf_efficient.kernels import adama_fold

    return adama_fold


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values around |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(1e-30))) - 7)


def _inputs(gdtype, sdtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g).to(gdtype) for s in SHAPES]
    ms = [torch.randn(s, generator=g).to(sdtype) for s in SHAPES]
    vs = [torch.rand(s, generator=g).to(sdtype) for s in SHAPES]
    return grads, ms, vs


def _fold(impl, grads, ms, vs, **kw):
    ms, vs = [m.clone() for m in ms], [v.clone() for v in vs]
    hp = dict(beta1=0.9, beta2=0.999, n=4)
    if impl == "reference":
        adama_reference.fold_reference(grads, ms, vs, FIRSTS, SCALES, **hp, **kw)
    elif impl == "foreach":
        adama_foreach.fold_foreach(grads, ms, vs, FIRSTS, SCALES, **hp, **kw)
    else:
        ms, vs = [m.to(DEV) for m in ms], [v.to(DEV) for v in vs]
        _triton().fold_triton([g.to(DEV) for g in grads], ms, vs, FIRSTS, torch.tensor(SCALES, device=DEV), **hp, **kw)
    return [x.cpu() for x in ms + vs]


@pytest.mark.parametrize("impl", ["triton", "foreach"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_fold_matches_reference(impl, gdtype, sdtype):
    grads, ms, vs = _inputs(gdtype, sdtype)
    ref = _fold("reference", grads, ms, vs)
    out = _fold(impl, grads, ms, vs)
    for a, b in zip(out, ref):
        assert a.dtype == sdtype
        if impl == "triton" and EXACT:  # same fp32 operations in the same order, same rounding: bit-exact
            assert torch.equal(a, b)
        elif sdtype == torch.float32:  # foreach fuses differently: a few fp32 ulps
            torch.testing.assert_close(a, b, rtol=4 * 2**-23, atol=1e-7)
        else:  # a different fp32 rounding (terms of size <= ~4: 1e-6 covers a few fp32 ulps, which matter where
            # m cancels to ~0) can flip a bf16 rounding: at most one bf16 ulp more
            assert bool(((a.float() - b.float()).abs() <= _bf16_ulp(b) + 1e-6).all())


@pytest.mark.parametrize("impl", ["triton", "foreach"])
def test_stochastic_rounding_of_bf16_states_is_unbiased(impl):
    """Folding the same tiny increment many times: nearest rounding loses it, stochastic keeps it on average."""
    n_el, steps, inc = 4096, 64, 1e-3  # 1e-3 of 1.0 is below bf16's half-ulp (2**-9): nearest never moves
    expected = 1.0 + (1 - 0.9) * inc * steps
    for stochastic in (False, True):
        dev = DEV if impl == "triton" else "cpu"
        m = [torch.ones(n_el, dtype=torch.bfloat16, device=dev)]
        v = [torch.ones(n_el, dtype=torch.bfloat16, device=dev)]
        gen = torch.Generator().manual_seed(0)
        for k in range(steps):
            g = [torch.full((n_el,), inc, device=dev)]
            if impl == "triton":
                _triton().fold_triton(g, m, v, [False], None, beta1=0.9, beta2=0.999, n=1,
                                      seed=k + 1 if stochastic else None)
            else:
                adama_foreach.fold_foreach(g, m, v, [False], None, beta1=0.9, beta2=0.999, n=1,
                                           generator=gen if stochastic else None)
        mean = float(m[0].float().mean())
        if stochastic:
            # each element is a sum of 64 independent +-ulp roundings: the mean over 4096 is within 3 sigma
            assert abs(mean - expected) < 3 * 2**-7 * (steps ** 0.5) / n_el ** 0.5 + 1e-6, mean
            assert len(set(m[0].float().tolist())) > 1  # elements differ: rounding is random, not shared
        else:
            assert mean == 1.0


@pytest.mark.parametrize("impl", ["triton", "foreach"])
@pytest.mark.parametrize("pdtype,sdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.bfloat16)])
def test_update_matches_reference(impl, pdtype, sdtype):
    g = torch.Generator().manual_seed(1)
    ps = [torch.randn(s, generator=g).to(pdtype) for s in SHAPES]
    ms = [torch.randn(s, generator=g).to(sdtype) for s in SHAPES]
    vs = [torch.rand(s, generator=g).to(sdtype) for s in SHAPES]
    kw = dict(step_sizes=[0.1, 0.2, 0.3, 0.4, 0.5], sqrt_c2s=[0.5, 0.6, 0.7, 0.8, 0.9],
              decays=[0.99, 1.0, 0.98, 0.97, 1.0], eps=1e-8)
    dev = DEV if impl == "triton" else "cpu"
    ref, out = [p.clone() for p in ps], [p.to(dev) for p in ps]
    adama_reference.update_reference(ref, ms, vs, **kw)
    (_triton().update_triton if impl == "triton" else adama_foreach.update_foreach)(
        out, [m.to(dev) for m in ms], [v.to(dev) for v in vs], **kw)
    out = [p.cpu() for p in out]
    for a, b in zip(out, ref):
        if pdtype == torch.float32:  # m / denom vs addcdiv: a few ulps of the step (up to ~0.5 / 1e-3)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert bool(((a.float() - b.float()).abs() <= _bf16_ulp(b)).all())


def test_triton_rejects_mixed_or_strided_inputs():
    k = _triton()
    grads, ms, vs = _inputs(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="one gradient dtype"):
        k.fold_triton([grads[0], grads[1].bfloat16()], ms[:2], vs[:2], FIRSTS[:2], None, beta1=0.9, beta2=0.9, n=1)
    with pytest.raises(ValueError, match="contiguous"):
        k.fold_triton([grads[1].t()], [ms[1].t()], [vs[1]], [True], None, beta1=0.9, beta2=0.9, n=1)


@pytest.mark.parametrize("impl", ["triton", "foreach", "per_tensor"])
@pytest.mark.parametrize("bucket_mb", [0.0, 32.0])
def test_optimizer_backends_match_rule(impl, bucket_mb):
    """Every backend, folding per gradient (bucket 0) or per backward (one bucket), follows AdamA's rule."""
    if impl == "triton":
        _triton()
    n = 2
    dev = DEV if impl == "triton" else "cpu"
    model, probe = mlp().to(dev), mlp()
    opt = AdamA(model.parameters(), lr=1e-2, weight_decay=0.05, accumulation_steps=n, impl=impl,
                bucket_mb=bucket_mb)
    ref = RefAdamA(list(model.parameters()), lr=1e-2, weight_decay=0.05, n=n)
    data = batches(1, 3 * n)
    for s in range(3):
        chunk = data[s * n:(s + 1) * n]
        ref.step(micro_grads(probe, chunk, n, params=[p.float() for p in ref.params]))
        for x, y in chunk:
            ((model(x.to(dev)) - y.to(dev)).pow(2).mean() / n).backward()
            assert not opt._pending  # the end-of-backward callback folded the last bucket
            assert all(p.grad is None for p in model.parameters())
        opt.step()
    assert close([p.cpu() for p in model.parameters()], ref.params, rtol=1e-5, atol=1e-6)


def test_bucket_holds_gradients_until_full():
    """With a bucket larger than one gradient, gradients wait in the queue (not in p.grad) until it fills."""
    model = mlp(d=64, hidden=64)  # weights 16 KiB each in fp32
    opt = AdamA(model.parameters(), bucket_mb=20 / 1024)  # 20 KiB: two weights fill it
    seen = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(len(opt._pending_bytes) and
                                                                    max(opt._pending_bytes.values())))
    x = torch.randn(4, 64)
    model(x).pow(2).mean().backward()
    assert max(seen) > 0 and max(seen) < 20 * 1024 + 16 * 1024
    assert not opt._pending and all(opt.state[p]["folds"] == 1 for p in model.parameters())


def test_reentrant_partial_gradients_are_summed():
    """Two gradients of one parameter inside one backward are parts of one micro-batch: summed, not folded twice."""
    p = torch.nn.Parameter(torch.randn(8))
    twin = torch.nn.Parameter(p.detach().clone())
    opt = AdamA([p], lr=1e-2, weight_decay=0.0)
    opt_ref = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.0)
    g1, g2 = torch.randn(8), torch.randn(8)
    opt._enqueue(p, g1)
    opt._enqueue(p, g2)
    opt.step()
    twin.grad = g1 + g2
    opt_ref.step()
    torch.testing.assert_close(p, twin)


# measured displacements: bf16 <= 0.008, 8-bit <= 0.043 (seed 0); tolerances ~2.5x
@pytest.mark.parametrize("bits,impl,steps,tol", [(16, "foreach", 30, 0.02), (16, "triton", 8, 0.02),
                                                 (8, "triton", 8, 0.10)])  # the interpreter is slow: fewer steps
def test_low_bit_stochastic_states_track_fp32(bits, impl, steps, tol):
    """bf16 / 8-bit states with stochastic rounding (the default) stay close to fp32 states over 30 steps
    of N = 4 (parameter displacement vs fp32 AdamA's after ``steps`` steps; bf16 keeps 8 significant bits,
    the 8-bit grid ~4 %
    spacing; the rounding noise averages out instead of biasing)."""
    def run(bits, impl):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        init = [p.detach().clone() for p in model.parameters()]
        dev = DEV if impl == "triton" else "cpu"
        model = model.to(dev)
        opt = AdamA(model.parameters(), lr=1e-3, accumulation_steps=4, state_bits=bits, min_8bit_size=1024,
                    impl=impl)
        for i, (x, y) in enumerate(batches(2, steps * 4, d=32, b=8)):
            ((model(x.to(dev)) - y.to(dev)).pow(2).mean() / 4).backward()
            if i % 4 == 3:
                opt.step()
        return [p.detach().cpu() for p in model.parameters()], opt, init
    p32, o32, init = run(32, "foreach")
    plow, olow, _ = run(bits, impl)
    if bits == 16:
        assert olow.state_bytes() * 2 == o32.state_bytes()
    else:
        assert olow.state_bytes() < 0.3 * o32.state_bytes()
    for a, b, q in zip(plow, p32, init):
        disp = float((a - b).norm() / (b - q).norm())
        assert disp < tol, disp


def _q8_pair(shape, block, seed, dev="cpu"):
    from hf_efficient.optim import lowbit

    g = torch.Generator().manual_seed(seed)
    m0 = (torch.randn(shape, generator=g) * torch.randn(shape, generator=g).exp()).to(dev)
    v0 = (torch.rand(shape, generator=g) * torch.randn(shape, generator=g).exp()).to(dev)
    out = []
    for _ in range(2):
        m, v = lowbit.Q8State.zeros(m0, True, block), lowbit.Q8State.zeros(v0, False, block)
        m.store(m0)
        v.store(v0)
        out.append((m, v))
    return out


@pytest.mark.parametrize("shape,block", [((5000,), 256), ((33, 70), 64), ((256,), 256), ((3,), 256)])
def test_q8_fold_kernel_matches_plain_torch(shape, block):
    """The Triton 8-bit fold re-quantizes like lowbit.quantize_blockwise: same scales, codes equal up to
    ties decided by one fp32 ulp (allowed: one code step on < 0.5 % of the elements)."""
    k = pytest.importorskip("hf_efficient.kernels.adama_q8")
    from hf_efficient.optim import lowbit

    (m_ref, v_ref), (m_k, v_k) = _q8_pair(shape, block, 0, DEV)
    grad = (torch.randn(shape) * 0.3).to(DEV)
    for first in (True, False):
        opt = AdamA([torch.nn.Parameter(torch.zeros(shape, device=DEV))], impl="per_tensor", accumulation_steps=4)
        st = {"exp_avg": m_ref, "exp_avg_sq": v_ref, "folds": 0 if first else 1}
        opt._fold_q8(st, grad, 0.9, 0.999, 4)
        k.fold_q8_triton([grad], [m_k], [v_k], [first], None, beta1=0.9, beta2=0.999, n=4,
                         mgrid=lowbit.value_map(True, DEV), vgrid=lowbit.value_map(False, DEV))
        for a, b in ((m_k, m_ref), (v_k, v_ref)):
            torch.testing.assert_close(a.scale, b.scale, rtol=2e-7 if EXACT else 1e-6, atol=0)
            diff = (a.codes.int() - b.codes.int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 5e-3


def test_q8_update_kernel_matches_plain_torch():
    k = pytest.importorskip("hf_efficient.kernels.adama_q8")
    from hf_efficient.optim import lowbit
    from hf_efficient.optim.adama import _ratio_bound

    (m, v), _ = _q8_pair((3000,), 256, 1, DEV)
    p_ref = torch.randn(3000).to(DEV)
    p_k = p_ref.clone()
    AdamA._update_q8(p_ref, m, v, lr=1e-2, wd=0.1, eps=1e-8, c1=1 - 0.9 ** 3, c2=1 - 0.999 ** 3, b1=0.9, b2=0.999)
    a, c, d = adama_reference.bias_corrections(1e-2, 0.9, 0.999, 3, 0.1)
    k.update_q8_triton([p_k], [m], [v], step_sizes=[a], sqrt_c2s=[c], decays=[d], eps=1e-8,
                       bound=_ratio_bound(0.9, 0.999), mgrid=lowbit.value_map(True, DEV),
                       vgrid=lowbit.value_map(False, DEV))
    torch.testing.assert_close(p_k, p_ref, rtol=1e-5, atol=1e-6)


def test_q8_optimizer_with_kernels_tracks_plain_torch():
    """AdamA(state_bits=8) through the Triton 8-bit kernels vs the per-tensor plain-torch path: 5 steps, N = 2."""
    pytest.importorskip("hf_efficient.kernels.adama_q8")
    from hf_efficient.optim import lowbit

    models = [torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models = [models[0], models[1].to(DEV)]
    # nearest rounding: the two paths draw stochastic roundings from different generators
    opts = [AdamA(m.parameters(), lr=1e-2, accumulation_steps=2, state_bits=8, min_8bit_size=1024, impl=impl,
                  stochastic_rounding=False)
            for m, impl in zip(models, ("per_tensor", "triton"))]
    for x, y in batches(3, 10, d=64, b=8):
        for m in models:
            dev = next(m.parameters()).device
            ((m(x.to(dev)) - y.to(dev)).pow(2).mean() / 2).backward()
        if opts[0].state[models[0][0].weight]["folds"] == 2:
            for o in opts:
                o.step()
    assert isinstance(opts[1].state[models[1][0].weight]["exp_avg"], lowbit.Q8State)
    for a, b in zip([p.cpu() for p in models[1].parameters()], models[0].parameters()):  # rare tie flips
        assert float((a - b).detach().norm() / (b.detach().norm() + 1e-12)) < 2e-3
