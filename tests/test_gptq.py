"""Block GPTQ: against a direct per-column solution, against the column-wise implementation it replaced,
row stacking, short/long groups; calibration sources; MoFQ over asymmetric formats."""
from __future__ import annotations

import pytest
import torch

from hf_efficient import MoFQConfig, formats
from hf_efficient.quantization.gptq import _inverse_hessian_cholesky, gptq_quantize
from hf_efficient.quantization.linear import rtn_quantize
from hf_efficient.quantization.mofq import select
from hf_efficient.quantization.packing import expand_groups
from tests.gptq_reference import gptq_quantize_columnwise


def _problem(k, n, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)
    return x, torch.randn(n, k, generator=g) * 0.05


def _deq(fmt, codes, params, group):
    return formats.decode(fmt, codes, {p: expand_groups(t, codes.shape[1], group) for p, t in params.items()})


@pytest.mark.parametrize("name", ["int4_asym", "nf4_asym", "fp3_sym", "int8_sym"])
def test_gptq_equals_direct_sequential_solution(name):
    """Per row: quantize column j, then move the not-yet-quantized columns to the minimiser of the damped
    proxy loss (w - ŵ) H (w - ŵ)ᵀ given the columns fixed so far (a linear solve per column), repeat. GPTQ's
    Cholesky updates must reach the same codes."""
    x, w = _problem(12, 5, tokens=64)
    fmt = formats.get_format(name)
    H = 2 * x.T @ x / len(x)
    damp = 0.01
    codes, params = gptq_quantize(w, H, fmt, 12, damp=damp)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(12)
    Hd = Hd.double()
    p = formats.fit_params(fmt, w, torch.float16)  # one group = the whole row: fitted on the original w
    for r in range(w.shape[0]):
        cur = w[r].double().clone()
        q = torch.zeros(12, dtype=torch.float64)
        for j in range(12):
            pr = {k: v[r] for k, v in p.items()}
            c = formats.encode(fmt, cur[j:j + 1].float(), pr)
            assert int(c) == int(codes[r, j]), (r, j)
            q[j] = formats.decode(fmt, c, pr).double()
            if j < 11:
                fixed, rest = slice(0, j + 1), slice(j + 1, 12)
                cur[rest] = w[r, rest].double() - torch.linalg.solve(Hd[rest, rest], Hd[rest, fixed] @
                                                                      (q[fixed] - w[r, fixed].double()))


@pytest.mark.parametrize("k,group", [(160, 64), (300, 256), (96, 32)])
@pytest.mark.parametrize("name", ["int4_asym", "nf4_asym", "fp8_sym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_block_gptq_matches_columnwise_reference(k, group, name, act_order):
    """Same codes as the replaced implementation except where float summation order flips a rounding
    (observed ≤ 0.04 % of codes), and the same layer-output error to 0.1 %."""
    x, w = _problem(k, 24)
    fmt = formats.get_format(name)
    H = 2 * x.T @ x / len(x)
    c1, p1 = gptq_quantize(w, H, fmt, group, act_order=act_order, block_size=64)
    c0, p0 = gptq_quantize_columnwise(w, H, fmt, group, act_order=act_order, block_size=64)
    assert (c1 != c0).float().mean() <= 2e-3
    err = lambda c, p: ((x @ (_deq(fmt, c, p, group) - w).T) ** 2).mean()  # noqa: E731
    assert torch.isclose(err(c1, p1), err(c0, p0), rtol=1e-3)


def test_block_size_does_not_change_the_result():
    """Lazy updates reorder sums only: block 1 (plain column-by-column OBQ updates) equals block 128."""
    x, w = _problem(200, 16)
    H = 2 * x.T @ x / len(x)
    fmt = formats.get_format("int4_asym")
    c1, p1 = gptq_quantize(w, H, fmt, 64, block_size=1)
    c2, p2 = gptq_quantize(w, H, fmt, 64, block_size=128)
    assert (c1 != c2).float().mean() <= 2e-3
    assert all(torch.allclose(p1[k], p2[k], rtol=1e-3, atol=1e-6) for k in p1)


def test_rows_are_independent_so_stacking_is_exact():
    x, w = _problem(130, 40)
    H = 2 * x.T @ x / len(x)
    fmt = formats.get_format("fp4_asym")
    c, p = gptq_quantize(w, H, fmt, 64)
    ca, pa = gptq_quantize(w[:25], H, fmt, 64)
    cb, pb = gptq_quantize(w[25:], H, fmt, 64)
    assert torch.equal(c, torch.cat([ca, cb]))
    assert all(torch.equal(p[k], torch.cat([pa[k], pb[k]])) for k in p)


def test_diagonal_hessian_is_rtn():
    """With uncorrelated inputs no error is fed forward: GPTQ reduces to round-to-nearest."""
    _, w = _problem(100, 8)
    H = torch.diag(torch.rand(100) + 0.5)
    fmt = formats.get_format("int4_asym")
    c, p = gptq_quantize(w, H, fmt, 32, damp=0.0)
    rc, rp = rtn_quantize(w, fmt, 32, torch.float16)
    assert torch.equal(c, rc) and all(torch.equal(p[k], rp[k]) for k in p)


def test_inverse_hessian_factor_equals_factorising_the_inverse():
    """The one-Cholesky route (reversed H) gives the upper factor of (H + λI)⁻¹ that factorising the explicit
    inverse gives: for a singular H (fewer tokens than inputs) made definite by the dampening, and with damp=0."""
    x, _ = _problem(90, 4, tokens=60)  # 60 tokens < 90 inputs: H is singular
    for H, damp in ((2 * x.T @ x / len(x), 0.01), ((x.T @ x)[:40, :40] / len(x) + torch.eye(40), 0.0)):
        U = _inverse_hessian_cholesky(H, damp)
        assert torch.equal(U, torch.triu(U)) and (torch.diag(U) > 0).all()
        Hd = H.double() + torch.eye(len(H), dtype=torch.float64) * (damp or 1e-6) * torch.diag(H).double().mean()
        expect = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
        assert torch.allclose(U.double(), expect, rtol=1e-3, atol=1e-4 * expect.abs().max())
    with pytest.raises(ValueError, match="positive definite"):
        _inverse_hessian_cholesky(-torch.eye(8), 0.01)


def test_gptq_bad_block_size():
    x, w = _problem(32, 4)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, x.T @ x, formats.get_format("int4_sym"), 32, block_size=0)


# ---- MoFQ over every format --------------------------------------------------------------------------

def _favouring(fmt_name, n=32, k=128, seed=0):
    """A weight matrix that is exactly representable in ``fmt_name`` (codes on its grid, g128 params)."""
    g = torch.Generator().manual_seed(seed)
    fmt = formats.get_format(fmt_name)
    codes = torch.tensor(fmt.valid_codes)[torch.randint(0, len(fmt.valid_codes), (n, k), generator=g)]
    if fmt.scheme == "sym":
        p = {"scales": torch.rand(n, 1, generator=g) * 0.02 + 0.01}
    elif fmt.scheme == "zero_point":
        p = {"scales": torch.rand(n, 1, generator=g) * 0.02 + 0.01, "zeros": torch.full((n, 1), 3.0)}
    else:
        p = {"scales_pos": torch.rand(n, 1, generator=g) * 0.02 + 0.01,
             "scales_neg": torch.rand(n, 1, generator=g) * 0.005 + 0.002}
    p = {kk: v.half().float() for kk, v in p.items()}
    # make each group hit the grid ends so RTN's fitted params equal the construction's
    codes[:, 0] = max(fmt.valid_codes, key=lambda c: fmt.grid[c])
    codes[:, 1] = min(fmt.valid_codes, key=lambda c: fmt.grid[c])
    return formats.decode(fmt, codes.to(torch.uint8), p)


# A symmetric grid is also an asymmetric one with equal scales (a tie), so the targets are the asym formats.
@pytest.mark.parametrize("target", ["int4_asym", "fp4_asym", "nf4_asym"])
def test_mofq_output_error_picks_the_format_a_layer_was_built_in(target):
    w = _favouring(target)
    x, _ = _problem(128, 1, tokens=256)
    cfg = MoFQConfig(bits=4, group_size=128)
    assert set(cfg.candidates) == {"int4_asym", "fp4_asym", "nf4_asym", "int4_sym", "fp4_sym", "nf4_sym"}
    assert cfg.selection == "output_error" and cfg.needs_calibration()
    errs = select.output_errors(w, x, cfg.candidates, 128, torch.float16, cfg.act_format)
    assert errs[target] < 1e-12 and all(e > 1e-9 for c, e in errs.items() if c != target), errs
    assert cfg.choose_format("l", w, x) == target


def test_mofq_batched_output_error_equals_per_candidate():
    x, w = _problem(96, 20, tokens=128)
    cands = ["int4_asym", "fp4_asym", "nf4_sym"]
    got = select.output_errors(w, x, cands, 32, torch.float16, lambda c: None)
    for c in cands:
        ref = ((x @ (select.rtn_dequant(w, c, 32, torch.float16) - w).T) ** 2).mean().item()
        assert got[c] == pytest.approx(ref, rel=1e-4)


def test_mofq_candidate_sets_and_bad_input():
    assert MoFQConfig(bits=4, candidates="sym").candidates == ["int4_sym", "fp4_sym"]
    assert MoFQConfig(bits=3).candidates[:3] == ["int3_asym", "fp3_asym", "nf3_asym"]
    with pytest.raises(ValueError, match="candidates='bogus'"):
        MoFQConfig(bits=4, candidates="bogus")
    with pytest.raises(ValueError, match="selection_tokens"):
        MoFQConfig(bits=4, selection_tokens=0)


# ---- calibration sources ---------------------------------------------------------------------------

def test_calibration_sources(embedded_tokenizer, tmp_path):
    from hf_efficient.data import calibration_windows, news_text

    plays = calibration_windows(embedded_tokenizer, 3, 64, source="plays")
    assert plays.shape == (3, 64)
    f = tmp_path / "a.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    own = calibration_windows(embedded_tokenizer, 2, 32, source=str(f))
    assert own.shape == (2, 32) and torch.equal(calibration_windows(embedded_tokenizer, 2, 32, source=str(tmp_path)),
                                               own)
    with pytest.raises(ValueError, match="needs the model"):
        calibration_windows(embedded_tokenizer, 2, 32, source="mixed")
    with pytest.raises(ValueError, match="not one of"):
        calibration_windows(embedded_tokenizer, 2, 32, source=str(tmp_path / "missing"))
    news = news_text()
    assert "New South Wales" in news and news.count("\n") >= 250


def test_generated_calibration_text_is_cached(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficient.data import calibration_windows, generated_text

    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path))
    monkeypatch.setattr("hf_efficient.data.GENERATION_PROMPTS", {"calib": ("Hello", "Write a poem."), "eval": ("Hi",)})
    monkeypatch.setattr("hf_efficient.data.GENERATED_TOKENS", 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    t = generated_text(model, tok, "calib", new_tokens=24, progress=False)
    assert len(tok(t).input_ids) >= 2 * 12
    assert generated_text(model, tok, "calib", new_tokens=24, progress=False) == t  # from the cache
    assert len(list((tmp_path / "generated").glob("*.json"))) == 1
    # ("mixed" adds windows of the training plays; with this test's empty cache that would re-tokenize them)
    w = calibration_windows(tok, 4, 16, source="generated", model=model)  # the cached text: no new file
    assert w.shape == (4, 16) and len(list((tmp_path / "generated").glob("*.json"))) == 1


@pytest.mark.parametrize("act_bits", [None, 8])
def test_each_layer_is_calibrated_on_the_quantized_previous_layer(tiny_llama, act_bits):
    """Layer i+1's calibration inputs are layer i's outputs with its final quantized linears (the
    QuantLinear reference path; activations quantized too under W8A8), and every linear ends up quantized."""
    import copy

    from hf_efficient.quantization import api
    from hf_efficient.quantization.linear import QuantLinear, reference_only

    model = copy.deepcopy(tiny_llama)
    seen = []
    collect = api._collect_layer_inputs

    def recording(layer, names, hidden, kwargs, *a):
        seen.append(([h.clone() for h in hidden], kwargs))
        return collect(layer, names, hidden, kwargs, *a)

    cfg = MoFQConfig(bits=8, group_size=-1, candidates=["int8_sym", "fp8_sym"], act_bits=act_bits) if act_bits \
        else MoFQConfig(bits=4, group_size=32, algorithm="gptq")
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "_collect_layer_inputs", recording)
        api.quantize_model(model, cfg, windows, progress=False)
    layers = api.decoder_layers(model)
    assert all(not isinstance(m, torch.nn.Linear) or isinstance(m, QuantLinear) or n == "lm_head"
               for n, m in model.named_modules())
    with reference_only(), torch.no_grad():
        assert len(seen) == len(layers) == 2
        for i in range(len(seen) - 1):
            (h0, kw), h1 = seen[i], seen[i + 1][0]
            out = [api._layer_output(layers[i](h, **k)) for h, k in zip(h0, kw)]
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(out, h1))


def test_rtn_selection_sample_spans_the_calibration_set(tiny_llama):
    """MoFQ without GPTQ runs only a token sample; it is spread over the windows (a "mixed" set holds one domain
    first and the other after it), not the first few."""
    import copy

    from hf_efficient.quantization import api

    seen = []
    capture = api._capture_first_layer_inputs

    def recording(model, layers, windows, device):
        seen.append(windows.clone())
        return capture(model, layers, windows, device)

    windows = torch.arange(10).repeat_interleave(16).view(10, 16)  # window i holds token i only
    cfg = MoFQConfig(bits=4, group_size=32, selection_tokens=32)  # 2 x 32 tokens: 4 of the 10 windows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "_capture_first_layer_inputs", recording)
        api.quantize_model(copy.deepcopy(tiny_llama), cfg, windows, progress=False)
    assert seen[0][:, 0].tolist() == [0, 3, 6, 9]
