"""The shortcuts that make calibrated quantization fast, each against the plain computation it replaces:
one Hessian per shared input, the collect pass stopping after the last linear, the integer-grid rounding."""
from __future__ import annotations

import pytest
import torch

from hf_efficient import formats
from hf_efficient.quantization import api
from hf_efficient.quantization.gptq import HessianAccumulator, _ColumnRounder, gptq_quantize


def _first_layer(model, n_windows=3, seqlen=16):
    windows = torch.randint(0, model.config.vocab_size, (n_windows, seqlen), generator=torch.Generator().manual_seed(2))
    layers = api.decoder_layers(model)
    hidden, kwargs = api._capture_first_layer_inputs(model, layers, windows, "cpu")
    layer = layers[0]
    names = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    return layer, names, hidden, kwargs


@torch.no_grad()
def test_shared_hessians_equal_separate_hessians(tiny_llama):
    """Linears that read one tensor share one Hessian; it equals each linear's own Hessian from a full forward
    (so neither the sharing nor the early stop of the collect pass changes what GPTQ sees)."""
    layer, names, hidden, kwargs = _first_layer(tiny_llama)
    groups = api._collect_layer_inputs(layer, names, hidden, kwargs, True, 64)
    assert sorted(sorted(g) for g, _, _ in groups) == sorted([
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
    own = {n: HessianAccumulator(m.in_features) for n, m in names.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=n: own[_n].add(a[0])) for n, m in names.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)
    finally:
        for hk in hooks:
            hk.remove()
    for group, acc, sample in groups:
        for n in group:
            assert own[n].n == acc.n == 3 * 16
            assert torch.equal(own[n].H, acc.H), n
        assert sample.shape[-1] == names[group[0]].in_features


@torch.no_grad()
def test_collect_pass_skips_the_work_after_the_last_linear(tiny_llama):
    """The last linear (down_proj) gets its input recorded but never runs its matmul during collection."""
    layer, names, hidden, kwargs = _first_layer(tiny_llama)
    ran = []
    hk = layer.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))
    try:
        groups = api._collect_layer_inputs(layer, names, hidden, kwargs, True, 64)
    finally:
        hk.remove()
    assert ran == [] and any(g == ["mlp.down_proj"] for g, _, _ in groups)


def test_hessian_sum_equals_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 48, generator=g)
    acc = HessianAccumulator(48)
    for chunk in x.split(128):
        acc.add(chunk[None])  # (1, tokens, in) as a layer sees it
    assert acc.n == 700
    assert torch.allclose(acc.H.double(), 2 * x.T.double() @ x.double() / 700, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int4_asym", "int4_sym", "int3_asym", "int8_sym"])
def test_integer_grid_rounding_equals_the_search(name):
    """ceil(x - 1/2) clamped equals the nearest-value search (ties to the smaller value, out-of-range values,
    zero scales), and the codes equal formats.encode's."""
    fmt = formats.get_format(name)
    fast = _ColumnRounder(fmt, "cpu")
    slow = _ColumnRounder(fmt, "cpu")
    assert fast.integer_grid
    slow.integer_grid = False
    g = torch.Generator().manual_seed(0)
    n = 400
    a = 2.0 ** -torch.randint(5, 10, (n,), generator=g).float()  # powers of two: the ties below are exact
    a[:7] = 0.0  # an all-zero group: scale 0 (divides by 1, decodes to the zero point)
    params = {"scales": a}
    if fmt.scale_scheme.offset:
        params["zeros"] = torch.randint(0, 2 ** fmt.bits, (n,), generator=g).float()
    P = fast.column_params(params)
    span = fast.hi - fast.lo + 4
    # rows of grid positions: exact midpoints (ties), random points, points beyond both ends
    pos = torch.stack([torch.full((n,), fast.lo - 2.0) + torch.randint(0, int(span) * 2, (n,), generator=g) / 2,
                       torch.rand(n, generator=g) * span + fast.lo - 2,
                       torch.randint(int(fast.lo), int(fast.hi), (n,), generator=g) + 0.5])
    b = params.get("zeros", torch.zeros(n))
    w = (pos - b) * P["da"]
    assert torch.equal(w[2] / P["da"] + b, pos[2])  # exact ties
    rows = {k: t.expand(3, n).contiguous() for k, t in P.items()}
    out = {}
    for key, r in (("fast", fast), ("slow", slow)):
        V, Q = torch.empty(3, n), torch.empty(3, n)
        step = r.block(rows, V, Q)
        for i in range(3):
            step(i, w[i])
        out[key] = (V, Q, r.codes(V))
    assert torch.equal(out["fast"][0], out["slow"][0]) and torch.equal(out["fast"][1], out["slow"][1])
    assert torch.equal(out["fast"][2], out["slow"][2])
    expand = {k: v.expand(3, n) for k, v in params.items()}
    assert torch.equal(out["fast"][2], formats.encode(fmt, w, expand))


def test_gptq_same_codes_with_integer_shortcut_off(monkeypatch):
    """The whole solver with the shortcut on and off: identical codes and parameters."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g) / 10
    w = torch.randn(40, 96, generator=g) * 0.05
    H = 2 * x.T @ x / len(x)
    fmt = formats.get_format("int4_asym")
    c1, p1 = gptq_quantize(w, H, fmt, 32)
    init = _ColumnRounder.__init__

    def no_shortcut(self, *a):
        init(self, *a)
        self.integer_grid = False

    monkeypatch.setattr(_ColumnRounder, "__init__", no_shortcut)
    c0, p0 = gptq_quantize(w, H, fmt, 32)
    assert torch.equal(c0, c1) and all(torch.equal(p0[k], p1[k]) for k in p0)
