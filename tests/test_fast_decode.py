"""The fused CPU decode step (enable_fast_decode; csrc/decode_step.cpp) against the layers' own forward.

Every comparison also counts the fused steps that ran, so a silent fallback cannot make a test pass."""
from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from torch import nn

import hf_efficient  # noqa: F401  (registers quant_method "lut" and the C++ ops)
from hf_efficient.kernels import lut_cpu as kernel
from hf_efficient.quantization import reference_only
from hf_efficient.quantization.lut import LUTConfig, enable_fast_decode, enable_lut
from hf_efficient.quantization.lut import decode

pytestmark = pytest.mark.skipif(not kernel.available(), reason="the C++ extension is not built")

# (name, config overrides, LUTConfig kwargs or None for fp32). "pad": K = 72 and 100 are not multiples of 16 or
# of the group (zero-padded tails, a short last group); head_dim 18.
CASES = [
    ("fp32", {}, None),
    ("int4-g32", {}, dict(bits=4, group_size=32)),
    ("int2-g64", {}, dict(bits=2, group_size=64)),
    ("nf4-g32", {}, dict(bits=4, group_size=32, fmt="nf")),  # code-indexed tables (grid shared by q/k/v)
    ("int4-g32-pad", dict(hidden_size=72, intermediate_size=100), dict(bits=4, group_size=32)),
    ("fp32-pad", dict(hidden_size=72, intermediate_size=100), None),
    ("afpq-fp4-g32", {}, dict(afpq=True, bits=4, group_size=32, fmt="fp")),  # converts on first use
]


def _tiny_config(**over):
    from conftest import tiny_llama_config  # tests/ is on sys.path (rootdir conftest)

    return tiny_llama_config(**over)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM

    dirs = {}
    for key in {repr(c[1]) for c in CASES}:
        torch.manual_seed(0)
        m = LlamaForCausalLM(_tiny_config(**eval(key)))
        with torch.no_grad():  # larger weights: varied greedy tokens instead of one repeated token
            for p in m.parameters():
                p.mul_(3)
        d = tmp_path_factory.mktemp("fast_decode")
        m.save_pretrained(d)
        dirs[key] = d
    return dirs


def _load(model_dirs, case):
    from transformers import AutoModelForCausalLM

    from hf_efficient import AFPQConfig

    _, over, q = next(c for c in CASES if c[0] == case)
    q = None if q is None else dict(q)
    kw = {}
    if q is not None:
        kw["quantization_config"] = AFPQConfig(**q) if q.pop("afpq", False) else LUTConfig(**q)
    model = AutoModelForCausalLM.from_pretrained(model_dirs[repr(over)], **kw).eval()
    if q is None or "afpq" in case:  # quantized models switch on when loaded; again is a no-op; fp32 by hand
        enable_fast_decode(model)
    return model


def _count(monkeypatch, name: str, ran=lambda out: True) -> list:
    """A list that gets one entry per call of ``decode.<name>`` whose result ``ran`` accepts."""
    calls = []
    real = getattr(decode, name)

    def spy(*a):
        out = real(*a)
        if ran(out):
            calls.append(1)
        return out

    monkeypatch.setattr(decode, name, spy)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that gets one entry per decoder-layer step that ran fused (from the layer's or the model's forward,
    one layer at a time or all layers in one ``decode_layers`` call)."""
    calls = _count(monkeypatch, "_run_layer")
    real = decode._run_layers

    def spy(stack, *a):
        out = real(stack, *a)
        calls.extend([1] * stack.n)
        return out

    monkeypatch.setattr(decode, "_run_layers", spy)
    return calls


@pytest.fixture
def stacked_steps(monkeypatch):
    """A list that gets one entry per model step whose layers all ran in one ``decode_layers`` call."""
    return _count(monkeypatch, "_run_layers")


@pytest.fixture
def model_steps(monkeypatch):
    """A list that gets one entry per decoder-stack forward that ran the fused model step."""
    return _count(monkeypatch, "_fast_model_step", lambda out: out is not None)


@pytest.fixture
def lm_steps(monkeypatch):
    """A list that gets one entry per causal-LM forward whose float head ran on decode_linear."""
    return _count(monkeypatch, "_fast_lm_step", lambda out: out is not None)


def _ids(n, batch=1, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_lut_models_switch_on_by_default(model_dirs, case):
    model = _load(model_dirs, case)
    layers = model.model.layers
    assert all(type(m).__name__ == "FastDecodeLlamaDecoderLayer" for m in layers)
    assert all(isinstance(m, decode._FastDecodeMixin) and type(m)._hfe_base.__name__ == "LlamaDecoderLayer"
               for m in layers)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
@pytest.mark.parametrize("static", [False, True])
def test_layer_step_equals_original_forward(model_dirs, case, static, fused_calls):
    """(a) One fused step of each layer against the layer's own forward, on the same cache, several positions."""
    from transformers import DynamicCache, StaticCache

    model = _load(model_dirs, case)
    q_cfg = next(c for c in CASES if c[0] == case)[2]
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    for past in (0, 1, 5, 23):
        for layer in model.model.layers:
            cache = StaticCache(config=cfg, max_cache_len=32) if static else DynamicCache(config=cfg)
            if past:
                for i in range(cfg.num_hidden_layers):  # a random past for every layer
                    kv = torch.randn(1, cfg.num_key_value_heads, past, hd, generator=gen)
                    cache.update(kv, kv * 0.5 + 0.1, i)
            x = torch.randn(1, 1, cfg.hidden_size, generator=gen) * 2
            pos = torch.tensor([[past]])
            pe = model.model.rotary_emb(x, pos)
            mask = None
            if static:  # what sdpa gets with a static cache: a bool row over the whole cache
                mask = (torch.arange(32) <= past).view(1, 1, 1, 32)
            c2 = copy.deepcopy(cache)
            kw = dict(attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=pe)
            with torch.no_grad():
                n0 = len(fused_calls)
                got = layer(x, cache=cache, **kw)
                assert len(fused_calls) == n0 + 1
                want = type(layer)._hfe_base.forward(layer, x, cache=c2, **kw)
            scale = want.abs().max()
            if q_cfg is None:  # float: only the summation order differs
                assert torch.allclose(got, want, atol=1e-4 * scale, rtol=0), float((got - want).abs().max() / scale)
            else:
                # The projections are the same kernels on the same streams (bit for bit on equal inputs:
                # test_attn_in_shares_tables_only_where_equal), but the norm's last-ulp differences can flip the
                # rounding of an int8 table entry (half a table step; on the FP4 two-scale tables of this test
                # up to 0.4 % of the output scale). Bugs (a wrong rotary, mask or head) give errors of order 1.
                err = (got - want).abs().max() / scale
                assert err < 1e-2 and (got - want).norm() / want.norm() < 3e-3, float(err)
            k1, v1 = cache.layers[layer.self_attn.layer_idx].keys, cache.layers[layer.self_attn.layer_idx].values
            k2, v2 = c2.layers[layer.self_attn.layer_idx].keys, c2.layers[layer.self_attn.layer_idx].values
            assert k1.shape == k2.shape and torch.allclose(k1, k2, atol=1e-4 * k2.abs().max(), rtol=0)
            assert torch.allclose(v1, v2, atol=1e-4 * v2.abs().max(), rtol=0)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_tokens_identical(model_dirs, case, cache, fused_calls, model_steps, lm_steps, stacked_steps):
    """(b) Greedy generate gives the same tokens with and without the fused step, except where the plain run's two
    best logits are a rounding apart: the quantized cases' tables may round one int8 entry the other way (see
    test_layer_step_equals_original_forward), and on some CPUs (a 2-core AVX-512 Xeon) that flips a near-tie of this random
    model's logits. After such a flip the two runs continue from different tokens, so the comparison stops there."""
    model = _load(model_dirs, case)
    assert type(model.model).__name__ == "FastDecodeLlamaModel"
    assert type(model).__name__ == "FastDecodeLlamaForCausalLM"
    ids = _ids(9)
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
              **({"cache_implementation": "static"} if cache == "static" else {}))
    with torch.no_grad():
        out = model.generate(ids, **kw)
    fused = out.sequences
    steps = fused.shape[1] - 9 - 1  # decode steps (generation may stop early at an EOS token)
    assert steps >= 4 and len(fused_calls) == steps * model.config.num_hidden_layers  # every step of every layer
    assert len(model_steps) == steps  # through the decoder stack's fused step
    assert len(lm_steps) == steps  # and the float head on decode_linear
    # all layers in one decode_layers call where the cache is a plain DynamicCache, one at a time otherwise
    assert len(stacked_steps) == (steps if cache == "dynamic" else 0)
    assert enable_fast_decode(model, False) == ["model.layers.0", "model.layers.1"]
    assert type(model.model).__name__ == "LlamaModel" and type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    plain = ref.sequences
    assert len(fused_calls) == steps * model.config.num_hidden_layers
    same = _same_greedy_tokens(fused[0, 9:], plain[0, 9:], ref.logits, 0.0 if case == "fp32" else 1e-2)
    assert same >= 4, (same, fused, plain)  # several steps compared before any flip
    assert len(set(plain[0, 9:].tolist())) > 2  # the test model does not just repeat one token


def _same_greedy_tokens(got, want, logits, tol: float) -> int:
    """How many leading tokens of two greedy runs agree; all of them, or they part at a step where the plain run
    (want, its per-step logits) scores got's token within tol * max |logit| of its best (a near-tie, not a bug)."""
    for i, (a, b) in enumerate(zip(got.tolist(), want.tolist())):
        if a != b:
            lp = logits[i][0].float()
            gap = float(lp.max() - lp[a])
            assert gap <= tol * float(lp.abs().max()), (i, a, b, gap, float(lp.abs().max()))
            return i
    assert got.shape == want.shape, (got, want)
    return got.numel()


@pytest.mark.parametrize("case", ["fp32", "int4-g32"])
def test_fallbacks_give_the_original_results(model_dirs, case, fused_calls):
    """(c) Batch 2 with left padding, gradients enabled, prefill, reference_only: the layers' own forward, bit for
    bit (the same model with the fused step switched off gives the same tensors)."""
    model = _load(model_dirs, case)
    ids = _ids(7, batch=2)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding

    def run():
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
            with reference_only():
                ref = model.generate(_ids(5), max_new_tokens=3, do_sample=False)
        out = model(_ids(5), use_cache=True)  # prefill with gradients enabled
        step = model(_ids(1, seed=3), cache=out.past_key_values, use_cache=True).logits  # one token, grad enabled
        return gen, ref, out.logits, step

    fused = run()
    assert not fused_calls
    enable_fast_decode(model, False)
    plain = run()
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    enable_fast_decode(model)
    with torch.no_grad():
        model.generate(_ids(5), max_new_tokens=3, do_sample=False)
    assert len(fused_calls) == 2 * model.config.num_hidden_layers  # and it does run where it should


def test_other_attention_and_training_fall_back(model_dirs, fused_calls):
    model = _load(model_dirs, "int4-g32")
    model.config._attn_implementation = "flex_attention"  # any attention function but sdpa/eager
    with torch.no_grad():
        try:
            out = model(_ids(4), use_cache=True)
            model(_ids(1), cache=out.past_key_values, use_cache=True)
        except Exception:  # flex may not run here; the point is that the fused step did not
            pass
    assert not fused_calls
    model.config._attn_implementation = "eager"
    model.train()
    with torch.no_grad():
        out = model(_ids(4), use_cache=True)
        model(_ids(1), cache=out.past_key_values, use_cache=True)
    assert not fused_calls
    model.eval()
    with torch.no_grad():
        out = model(_ids(4), use_cache=True)
        a = model(_ids(1), cache=copy.deepcopy(out.past_key_values), use_cache=True).logits
        assert len(fused_calls) == 2
        enable_fast_decode(model, False)
        b = model(_ids(1), cache=out.past_key_values, use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-4 * b.abs().max(), rtol=0)


def test_disable_restores_and_state_dict_unchanged(model_dirs, fused_calls):
    """(d) enable_fast_decode(model, False) puts the original classes back; nothing else changes."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _load(model_dirs, "int4-g32")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_fast_decode(model, False) == ["model.layers.0", "model.layers.1"]
    assert all(type(m) is LlamaDecoderLayer and "_hfe_plan" not in m.__dict__ for m in model.model.layers)
    assert enable_fast_decode(model, False) == []
    sd2 = model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        model.generate(_ids(5), max_new_tokens=3, do_sample=False)
    assert not fused_calls
    assert enable_fast_decode(model) == ["model.layers.0", "model.layers.1"]
    assert enable_fast_decode(model) == ["model.layers.0", "model.layers.1"]  # idempotent
    enable_lut(model, False)  # back to the reference path: the layers are switched back too
    assert all(type(m) is LlamaDecoderLayer for m in model.model.layers)
    assert enable_lut(model, fast_decode=False) and all(type(m) is LlamaDecoderLayer for m in model.model.layers)


def test_layer_changes_rebuild_the_plan(model_dirs, fused_calls):
    """A projection replaced (e.g. by a LoRA wrapper) or switched off the kernels: the plan follows."""
    model = _load(model_dirs, "fp32")
    layer = model.model.layers[0]
    with torch.no_grad():
        model.generate(_ids(5), max_new_tokens=2, do_sample=False)
        n = len(fused_calls)
        old = layer.self_attn.q_proj
        layer.self_attn.q_proj = nn.Sequential(old)  # not a projection the fused step knows
        model.generate(_ids(5), max_new_tokens=2, do_sample=False)
        assert len(fused_calls) == n + 1  # layer 1 only
        layer.self_attn.q_proj = old
        layer.self_attn.q_proj.weight = nn.Parameter(old.weight * 0)  # a new weight tensor
        a = model.generate(_ids(5), max_new_tokens=4, do_sample=False)
        assert len(fused_calls) == n + 1 + 3 * 2
        enable_fast_decode(model, False)
        assert torch.equal(a, model.generate(_ids(5), max_new_tokens=4, do_sample=False))


# ------------------------------------------------------------------------------------------------
# The decoder stack's fused step (decode._fast_model_step)
# ------------------------------------------------------------------------------------------------

def _cache_with_past(model, kind, past, gen):
    """A dynamic or static cache holding ``past`` random positions in every layer."""
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=cfg, max_cache_len=32) if kind == "static" else DynamicCache(config=cfg)
    if past:
        for i in range(cfg.num_hidden_layers):
            kv = torch.randn(1, cfg.num_key_value_heads, past, hd, generator=gen)
            cache.update(kv, kv * 0.5 + 0.1, i)
    return cache


@pytest.mark.parametrize("case", ["fp32", "int4-g32", "int4-g32-pad"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("inputs", ["plain", "positions", "mask2d", "embeds", "eager"])
def test_model_step_equals_stack_forward(model_dirs, case, kind, inputs, fused_calls, model_steps, stacked_steps):
    """The fused model step gives the decoder stack's own forward (its layers fused as well) bit for bit: the same
    embedding, rotary, mask and layer steps, and the cache updated alike. With a DynamicCache that holds a past,
    the step runs all layers in one decode_layers call, the stack's forward one layer step at a time (each with
    cache.update), so this also checks the two against each other."""
    model = _load(model_dirs, case)
    stack = model.model
    base = type(stack)._hfe_base
    if inputs == "eager":
        model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(2)
    for past in (0, 1, 7):
        cache = _cache_with_past(model, kind, past, gen)
        c2 = copy.deepcopy(cache)
        tok = _ids(1, seed=past)
        kw = dict(input_ids=tok, use_cache=True)
        if inputs == "positions":
            kw["position_ids"] = torch.tensor([[past]])
        elif inputs == "mask2d":
            kw["attention_mask"] = torch.ones(1, past + 1, dtype=torch.long)
        elif inputs == "embeds":
            kw = dict(inputs_embeds=stack.embed_tokens(tok).detach(), use_cache=True)
        with torch.no_grad():
            n, f, st = len(model_steps), len(fused_calls), len(stacked_steps)
            got = stack(cache=cache, **kw)
            assert len(model_steps) == n + 1 and len(fused_calls) == f + model.config.num_hidden_layers
            assert len(stacked_steps) == st + (kind == "dynamic" and past > 0)
            want = base.forward(stack, cache=c2, **kw)
            assert len(model_steps) == n + 1 and len(stacked_steps) == st + (kind == "dynamic" and past > 0)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        stacked = kind == "dynamic" and past > 0
        for a, b in zip(cache.layers, c2.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            # the stacked step appends in place: its caches are views of buffers with spare rows (not contiguous
            # where there are several kv heads); elsewhere the cache's own update's tensors
            assert a.keys.is_contiguous() == b.keys.is_contiguous() or stacked
            if stacked:
                assert a.keys.untyped_storage().nbytes() > a.keys.numel() * 4


def test_stacked_step_conditions(model_dirs, fused_calls, stacked_steps):
    """decode_layers runs for a plain DynamicCache whose layers all hold a past; a cache layer without one, a
    DynamicCache subclass (its update may differ) or a layer in training mode take the per-layer steps (each with
    cache.update), which give the same hidden states and cache bit for bit."""
    from transformers import DynamicCache

    class MyCache(DynamicCache):
        pass

    model = _load(model_dirs, "int4-g32")
    stack = model.model
    with torch.no_grad():
        prefill = model(_ids(6), use_cache=True).past_key_values
    tok = _ids(1, seed=3)

    def step(cache):
        with torch.no_grad():
            return stack(input_ids=tok, cache=cache, use_cache=True).last_hidden_state, cache

    want, wc = step(copy.deepcopy(prefill))
    assert len(stacked_steps) == 1
    unfilled = DynamicCache(config=model.config)  # layers not initialized yet: cache.update starts them
    step(unfilled)
    assert len(stacked_steps) == 1 and all(x.keys.shape[-2] == 1 for x in unfilled.layers)
    mine = MyCache()
    for i, x in enumerate(prefill.layers):
        mine.update(x.keys, x.values, i)
    n = len(fused_calls)
    got, gc = step(mine)
    assert len(stacked_steps) == 1 and len(fused_calls) == n + 2 and torch.equal(got, want)
    for a, b in zip(gc.layers, wc.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    model.model.layers[1].train()
    got, _ = step(copy.deepcopy(prefill))
    model.model.layers[1].eval()
    assert len(stacked_steps) == 1 and torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    got, _ = step(copy.deepcopy(prefill))  # all layers fused again: the stacked step, the same result
    assert len(stacked_steps) == 2 and torch.equal(got, want)


@pytest.mark.parametrize("case", ["fp32", "int4-g32"])
def test_stack_plan_follows_changes(model_dirs, case, stacked_steps):
    """The stacked step's arguments are reused while nothing they were built from changed, and rebuilt when a
    projection's weight, its LUT stream, a norm weight or a projection module is replaced (results then as the
    unfused model's)."""
    model = _load(model_dirs, case)
    stack = model.model
    with torch.no_grad():
        prefill = model(_ids(6), use_cache=True).past_key_values
    tok = _ids(1, seed=3)

    def step():
        with torch.no_grad():
            return stack(input_ids=tok, cache=copy.deepcopy(prefill), use_cache=True).last_hidden_state

    def unfused():
        enable_fast_decode(model, False)
        try:
            return step()
        finally:
            enable_fast_decode(model)

    step()
    st = stack._hfe_stack
    step()
    assert stack._hfe_stack is st and len(stacked_steps) == 2
    layer = stack.layers[1]
    # (change, whether it changes the values)
    changes = [(lambda: setattr(layer.post_attention_layernorm, "weight",
                                nn.Parameter(layer.post_attention_layernorm.weight * 2)), True),
               (lambda: setattr(layer.mlp, "up_proj", copy.deepcopy(layer.mlp.up_proj)), False)]
    if case == "fp32":
        changes.append((lambda: setattr(layer.mlp.down_proj, "weight", nn.Parameter(layer.mlp.down_proj.weight * 0)),
                        True))
    else:  # a new stream buffer (what .to() or a re-conversion leaves)
        q = layer.self_attn.v_proj
        changes.append((lambda: q._buffers.__setitem__("_rl_stream", q._buffers["_rl_stream"].clone()), False))
    for change, alters in changes:
        before = step()
        change()
        got = step()
        assert stack._hfe_stack is not st
        st = stack._hfe_stack
        want = unfused()
        assert torch.equal(got, before) != alters
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("rope", [None, dict(rope_type="linear", factor=2.0), dict(rope_type="dynamic", factor=2.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
                                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=128)])
def test_rope_equals_rotary_module(rope):
    """The model step's cos/sin of one position equal the rotary module's, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    over = {} if rope is None else {"rope_parameters": {**rope, "rope_theta": 10000.0}}
    rot = LlamaRotaryEmbedding(_tiny_config(**over))
    h = torch.randn(1, 1, 64)
    for pos in (0, 1, 17, 300, 4000):
        want = rot(h, torch.tensor([[pos]]))
        got = decode._rope(rot, h, torch.tensor([[pos]]), pos)
        assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(got, want)), (rope, pos)


@pytest.mark.parametrize("past", [0, 1, 9])
@pytest.mark.parametrize("attn", [None, "ones-long", "ones-bool", "padded", "longer"])
def test_no_mask_where_the_model_step_builds_none(model_dirs, past, attn):
    """Where the model step skips the mask (sdpa, a DynamicCache of full-attention layers, no attention mask or a
    2-D one of the cache's length + 1 that masks nothing, the position right after the cache), transformers' own
    mask function returns None as well; a mask that pads or has another length is built."""
    from transformers.masking_utils import create_causal_mask

    model = _load(model_dirs, "fp32")
    cfg = model.config
    assert cfg._attn_implementation == "sdpa"
    cache = _cache_with_past(model, "dynamic", past, torch.Generator().manual_seed(0))
    assert decode._plain_dynamic(cache)
    am = None
    if attn is not None:
        am = torch.ones(1, past + (2 if attn == "longer" else 1), dtype=torch.bool if attn == "ones-bool" else torch.long)
        if attn == "padded":
            am[0, 0] = 0
    mask = create_causal_mask(config=cfg, inputs_embeds=torch.randn(1, 1, cfg.hidden_size), attention_mask=am,
                              cache=cache, position_ids=torch.tensor([[past]]))
    skipped = decode._no_padding(am, past)
    assert skipped == (attn in (None, "ones-long", "ones-bool"))
    if skipped:
        assert mask is None


def test_model_step_fallbacks(model_dirs, fused_calls, model_steps):
    """Output capture, tuple outputs, a hooked layer, unknown kwargs, batch 2, gradients: the stack's own forward,
    with the same results as the model with the fused step switched off."""
    model = _load(model_dirs, "fp32")
    stack = model.model
    with torch.no_grad():
        prefill = model(_ids(5), use_cache=True).past_key_values
    seen = []
    cases = [dict(output_hidden_states=True), dict(output_attentions=True), dict(return_dict=False),
             dict(cache_position=torch.tensor([5])), "hook", "batch2", "grad"]

    def run(c):
        cache = copy.deepcopy(prefill)
        kw = c if isinstance(c, dict) else {}
        ids = _ids(1, seed=4)
        if c == "batch2":
            ids, cache = _ids(1, batch=2), None
        handle = stack.layers[1].register_forward_hook(lambda *a: seen.append(1)) if c == "hook" else None
        try:
            with torch.set_grad_enabled(c == "grad"):
                out = stack(input_ids=ids, cache=cache, use_cache=True, **kw)
        finally:
            if handle is not None:
                handle.remove()
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    for c in cases:
        got = run(c)
        assert not model_steps, c
        enable_fast_decode(model, False)
        want = run(c)
        enable_fast_decode(model)
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0), c
    assert len(seen) == 2  # the hook ran, fused step or not
    with torch.no_grad():
        a = stack(input_ids=_ids(1), cache=copy.deepcopy(prefill), use_cache=True)
        b = stack(_ids(1), cache=copy.deepcopy(prefill), use_cache=True)  # input_ids by position
    assert len(model_steps) == 2 and torch.equal(a.last_hidden_state, b.last_hidden_state)  # it runs where it should


@pytest.mark.parametrize("case", ["fp32", "int4-g32"])
def test_lm_step_head_and_fallbacks(model_dirs, case, lm_steps, model_steps):
    """The causal LM's one-token step: logits as its own forward's within summation-order rounding (float head on
    decode_linear), or bit for bit (a hooked head and a quantized head, enable_lut head_bits, run by their module
    call on the same hidden state); labels, logits_to_keep > 1 and gradients take its own forward."""
    model = _load(model_dirs, case)
    base = type(model)._hfe_base
    with torch.no_grad():
        prefill = model(_ids(5), use_cache=True).past_key_values
    tok = _ids(1, seed=4)

    def both(**kw):
        with torch.no_grad():
            got = model(input_ids=tok, cache=copy.deepcopy(prefill), use_cache=True, **kw)
            want = base.forward(model, input_ids=tok, cache=copy.deepcopy(prefill), use_cache=True, **kw)
        return got, want

    got, want = both()
    assert len(lm_steps) == 1 and got.logits.shape == want.logits.shape == (1, 1, model.config.vocab_size)
    scale = float(want.logits.abs().max())
    assert torch.allclose(got.logits, want.logits, atol=1e-5 * scale, rtol=0)
    got, want = both(logits_to_keep=1)
    assert len(lm_steps) == 2 and torch.allclose(got.logits, want.logits, atol=1e-5 * scale, rtol=0)
    with torch.no_grad():  # input_ids given by position, as model(ids, ...) does
        pos = model(tok, past_key_values=copy.deepcopy(prefill), use_cache=True)
    assert len(lm_steps) == 3 and torch.equal(pos.logits, got.logits)
    both(labels=tok)
    both(logits_to_keep=2)
    with torch.enable_grad():
        model(input_ids=tok, cache=copy.deepcopy(prefill), use_cache=True)
    assert len(lm_steps) == 3
    seen = []
    handle = model.lm_head.register_forward_hook(lambda *a: seen.append(1))
    got, want = both()
    handle.remove()
    assert len(lm_steps) == 4 and len(seen) == 2 and torch.equal(got.logits, want.logits)
    enable_lut(model, head_bits=4, head_group_size=32)  # the head becomes a LUTHead, run by its module call
    assert type(model).__name__ == "FastDecodeLlamaForCausalLM"
    n = len(model_steps)
    got, want = both()
    assert len(lm_steps) == 5 and len(model_steps) == n + 2 and torch.equal(got.logits, want.logits)
    with torch.no_grad():
        model.generate(_ids(5), max_new_tokens=3, do_sample=False)
    assert len(lm_steps) == 7 and len(model_steps) == n + 4


def test_model_classes_and_sliding_windows(fused_calls, model_steps):
    """Mistral without a sliding window gets the model step; with one, neither its layers nor its stack switch."""
    from transformers import MistralConfig, MistralForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw)).eval()
    assert enable_fast_decode(model) == ["model.layers.0", "model.layers.1"]
    assert type(model.model).__name__ == "FastDecodeMistralModel"
    ids = _ids(6)
    with torch.no_grad():
        fused = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert len(model_steps) == 4
        enable_fast_decode(model, False)
        assert type(model.model).__name__ == "MistralModel"
        assert torch.equal(fused, model.generate(ids, max_new_tokens=5, do_sample=False))
    slid = MistralForCausalLM(MistralConfig(sliding_window=4, **kw)).eval()
    assert enable_fast_decode(slid) == [] and type(slid.model).__name__ == "MistralModel"


def test_qwen2_biases(fused_calls, model_steps):
    """Qwen2 (q/k/v biases) takes the same path with the biases added."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    ids = _ids(6)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert enable_fast_decode(model) == ["model.layers.0", "model.layers.1"]
        assert type(model.model).__name__ == "FastDecodeQwen2Model"
        fused = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert len(fused_calls) == 7 * 2 and len(model_steps) == 7 and torch.equal(plain, fused)


def test_unsupported_models_give_empty_and_log(caplog):
    """(e) A non-Llama model: [] and one warning; nothing is switched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    decode._WARNED.discard("GPT2LMHeadModel")
    with caplog.at_level(logging.WARNING, logger=decode.__name__):
        assert enable_fast_decode(model) == []
        assert enable_fast_decode(model) == []
    msgs = [r.getMessage() for r in caplog.records if r.name == decode.__name__]
    assert len(msgs) == 1 and "GPT2LMHeadModel" in msgs[0] and "supported" in msgs[0]
    assert enable_fast_decode(nn.Linear(2, 2)) == []


def test_unsupported_activation_is_refused(caplog):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_tiny_config(hidden_act="gelu"))
    with caplog.at_level(logging.WARNING, logger=decode.__name__):
        assert enable_fast_decode(model) == []
    assert any("silu" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# The ops themselves
# ------------------------------------------------------------------------------------------------

def _qlayer(n, k, fmt, group_size, seed):
    from hf_efficient.quantization import QuantLinear
    from hf_efficient.quantization.lut.layer import prepare_layer

    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    q = QuantLinear.from_linear(lin, fmt, group_size)
    return prepare_layer(q)


def test_attn_in_shares_tables_only_where_equal():
    """q/k/v of mixed geometries (INT4 g32, INT4 g32, INT2 g64; NF4 with two different grids; float): each equals
    lut_gemm / the float GEMV of the normalized row (cos 1, sin 0: no rotation)."""
    ops = torch.ops.hf_efficient
    H, heads, kvh, d = 64, 4, 2, 16
    specs = [[("int4_asym", 32), ("int4_asym", 32), ("int2_asym", 64)], [("nf4_asym", 32), ("fp4_sym", 32), ("nf4_asym", 32)],
             [("int4_asym", 32), None, ("int4_sym", 64)]]
    # x = +-2 with eps 0: RMSNorm is exact (x / 2 * w) in any summation order, so the LUT rows are compared
    # bit for bit with lut_gemm of the same normalized row
    sign = torch.randint(0, 2, (1, 1, H), generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = sign.float() * 2
    nw = torch.rand(H) + 0.5
    h = (nw * sign.float()).view(1, H)
    for spec in specs:
        ws, grids, meta, want = [], [], [], []
        for i, (s, n) in enumerate(zip(spec, (heads * d, kvh * d, kvh * d))):
            if s is None:
                w = torch.randn(n, H)
                ws.append(w), grids.append(None), meta.extend([0, 0, H, n])
                want.append(h @ w.t())
                continue
            lw = _qlayer(n, H, s[0], s[1], seed=i)
            ws.append(lw.qweight), grids.append(lw.grid), meta.extend([lw.bits, lw.group_size, H, n])
            want.append(lw.matmul(h))
        q, k, v = ops.decode_attn_in(x, nw, 0.0, ws, grids, [None] * 3, meta, torch.ones(d), torch.zeros(d),
                                     heads, kvh, d)
        assert q.shape == (1, heads, 1, d) and k.shape == v.shape == (1, kvh, 1, d)
        for got, exp, s in zip((q, k, v), want, spec):
            if s is None:
                assert torch.allclose(got.reshape(1, -1), exp, atol=1e-5 * exp.abs().max(), rtol=0)
            else:
                assert torch.equal(got.reshape(1, -1), exp), spec


def test_ops_reject_bad_arguments():
    ops = torch.ops.hf_efficient
    H, d = 64, 16
    w = [torch.randn(64, H), torch.randn(32, H), torch.randn(32, H)]
    args = dict(x=torch.randn(1, 1, H), nw=torch.ones(H))
    meta = [0, 0, H, 64, 0, 0, H, 32, 0, 0, H, 32]
    ok = ops.decode_attn_in(args["x"], args["nw"], 1e-5, w, [None] * 3, [None] * 3, meta, torch.ones(d),
                            torch.zeros(d), 4, 2, d)
    assert ok[0].shape == (1, 4, 1, d)
    with pytest.raises(RuntimeError, match="one row"):
        ops.decode_attn_in(torch.randn(2, 1, H), args["nw"], 1e-5, w, [None] * 3, [None] * 3, meta, torch.ones(d),
                           torch.zeros(d), 4, 2, d)
    with pytest.raises(RuntimeError, match="projection 1"):
        ops.decode_attn_in(args["x"], args["nw"], 1e-5, w, [None] * 3, [None] * 3, meta, torch.ones(d),
                           torch.zeros(d), 4, 4, d)
    with pytest.raises(RuntimeError, match="expected 3 projections"):
        ops.decode_attn_in(args["x"], args["nw"], 1e-5, w[:2], [None] * 2, [None] * 2, meta[:8], torch.ones(d),
                           torch.zeros(d), 4, 2, d)
    with pytest.raises(RuntimeError, match="qweight"):
        ops.decode_attn_in(args["x"], args["nw"], 1e-5, [torch.zeros(10, dtype=torch.uint8)] + w[1:], [None] * 3,
                           [None] * 3, [4, 32, H, 64] + meta[4:], torch.ones(d), torch.zeros(d), 4, 2, d)
    q, k, v = ok
    mw = [torch.randn(H, 64), torch.randn(96, H), torch.randn(96, H), torch.randn(H, 96)]
    mmeta = [0, 0, 64, H, 0, 0, H, 96, 0, 0, H, 96, 0, 0, 96, H]
    y = ops.decode_attn_out_mlp(q, k, v, None, 0.25, args["x"], args["nw"], 1e-5, mw, [None] * 4, [None] * 4, mmeta)
    assert y.shape == (1, 1, H)
    with pytest.raises(RuntimeError, match="mask"):
        ops.decode_attn_out_mlp(q, k, v, torch.ones(1, 1, 1, 3, dtype=torch.bool), 0.25, args["x"], args["nw"], 1e-5,
                                mw, [None] * 4, [None] * 4, mmeta)
    for kv in ((k, v.half()), (k.double(), v.double())):
        with pytest.raises(RuntimeError, match="float32 or float16 CPU tensors alike"):
            ops.decode_attn_out_mlp(q, *kv, None, 0.25, args["x"], args["nw"], 1e-5, mw, [None] * 4, [None] * 4, mmeta)
    with pytest.raises(RuntimeError, match="projection shapes"):
        ops.decode_attn_out_mlp(q, k, v, None, 0.25, args["x"], args["nw"], 1e-5, mw[::-1], [None] * 4, [None] * 4,
                                [0, 0, 96, H, 0, 0, H, 96, 0, 0, H, 96, 0, 0, H, 64])


@pytest.mark.parametrize("K", [64, 72, 100, 576])
@pytest.mark.parametrize("threads", [1, 2])
def test_float_projections_match_linear(K, threads):
    """The ops' own float GEMV (contiguous weights; K with and without a tail of the 32-wide loop, rows split over
    threads) and torch's mv (a strided weight) give F.linear's q/k/v within summation-order rounding."""
    ops = torch.ops.hf_efficient
    d = 16
    gen = torch.Generator().manual_seed(K)
    w = [torch.randn(n, K, generator=gen) for n in (64, 32, 32)]
    strided = [x.t().contiguous().t() for x in w]  # the same values, column-major
    assert not strided[0].is_contiguous()
    x = torch.randn(1, 1, K, generator=gen)
    meta = [0, 0, K, 64, 0, 0, K, 32, 0, 0, K, 32]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ws in (w, strided):
            q, k, v = ops.decode_attn_in(x, torch.ones(K), 1e-5, ws, [None] * 3, [None] * 3, meta, torch.ones(d),
                                         torch.zeros(d), 4, 2, d)  # cos 1, sin 0: no rotation
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            for got, wi in zip((q, k, v), w):
                want = torch.nn.functional.linear(h, wi).view(-1)
                assert torch.allclose(got.reshape(-1), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_float_gemv_every_isa(isa, monkeypatch):
    """The decode ops' float GEMV for each ISA this CPU runs (HF_EFFICIENT_LUT_ISA caps it as it caps the LUT
    engines: plain loop, 8-wide AVX2, 16-wide AVX-512 with a masked tail) equals a float64 product within float32
    summation rounding: K below, at and past each vector width and unroll, odd N, zeros and large values."""
    from hf_efficient.kernels import lut_cpu

    available = lut_cpu.available_isas()
    if isa not in available:
        pytest.skip(f"this CPU has no {isa} (available: {available})")
    monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", isa)
    ops = torch.ops.hf_efficient
    gen = torch.Generator().manual_seed(7)
    for K in (1, 5, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 577):
        for n, scale in ((1, 1.0), (7, 1.0), (40, 1e15)):
            w = torch.randn(n, K, generator=gen) * scale
            w[0, : K // 2] = 0.0  # a row that is zero in part (all of it at K = 1)
            x = torch.randn(1, 1, K, generator=gen) * scale
            b = torch.randn(n, generator=gen)
            got = ops.decode_linear(x, w, b).view(-1).double()
            want = (w.double() @ x.view(-1).double()) + b.double()
            bound = 1e-6 * K * ((w.double().abs() @ x.view(-1).double().abs()) + b.double().abs()) + 1e-30
            assert bool(((got - want).abs() <= bound).all()), (isa, K, n, scale)
    zero = ops.decode_linear(torch.zeros(1, 1, 65), torch.zeros(3, 65), None)
    assert torch.equal(zero, torch.zeros(1, 1, 3))


def _attention_f64(q, k, v, mask, scaling):
    """One query's softmax attention in float64, GQA (head h reads kv head h // (heads / kv_heads))."""
    heads, kvh = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(heads // kvh, 1)[0]
    vv = v.double().repeat_interleave(heads // kvh, 1)[0]
    s = torch.einsum("hd,hsd->hs", q[0, :, 0].double(), kk) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.einsum("hs,hsd->hd", torch.softmax(s, -1), vv).reshape(-1)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_every_isa(threads, monkeypatch):
    """The decode ops' one-query attention equals a float64 softmax attention for each ISA this CPU runs
    (HF_EFFICIENT_LUT_ISA caps it as it caps the LUT engines). The AVX2 body takes the heads of one kv head together,
    at most four a pass over the cache: 1 to 8 heads per kv head (groups of 4 + 4, 4 + 3), runs split between
    threads mid-group (the longest cache), head_dim a multiple of 16, of 8 only and of neither (the plain loop),
    kv lengths below, at and past the 8-key blocks, bool and float masks, a cache whose rows are not adjacent, and
    float32 and float16 caches (the reference reads the float16 values exactly). The op's o_proj is the identity and
    its MLP's down projection zero, so its output is the attention's."""
    ops = torch.ops.hf_efficient
    gen = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for isa in kernel.available_isas():
            monkeypatch.setenv("HF_EFFICIENT_LUT_ISA", isa)
            for heads, kvh, d in ((4, 2, 16), (9, 3, 64), (8, 1, 24), (6, 6, 8), (5, 1, 18), (7, 1, 16)):
                H, inter = heads * d, 8
                mw = [torch.eye(H), torch.randn(inter, H, generator=gen), torch.randn(inter, H, generator=gen),
                      torch.zeros(H, inter)]
                meta = [0, 0, H, H, 0, 0, H, inter, 0, 0, H, inter, 0, 0, inter, H]
                for S in (1, 7, 8, 9, 17, 40, 600):
                    q = torch.randn(1, heads, 1, d, generator=gen)
                    k = torch.randn(1, kvh, S, d, generator=gen) * 2
                    v = torch.randn(1, kvh, S, d, generator=gen)
                    if S == 17:  # rows kvh * d apart, as in a (1, S, kvh, d) buffer
                        k = k.transpose(1, 2).contiguous().transpose(1, 2)
                        assert k.stride(2) == kvh * d
                    keep = torch.rand(S, generator=gen) > 0.3
                    keep[S // 2] = True
                    masks = (None, keep.view(1, 1, 1, S),
                             torch.where(keep, torch.randn(S, generator=gen), float("-inf")).view(1, 1, 1, S))
                    for mask, dtype in itertools.product(masks, (torch.float32, torch.float16)):
                        kt, vt = k.to(dtype), v.to(dtype)
                        assert kt.stride() == k.stride()
                        y = ops.decode_attn_out_mlp(q, kt, vt, mask, 0.3, torch.zeros(1, 1, H), torch.ones(H), 1e-5, mw,
                                                    [None] * 4, [None] * 4, meta).view(-1).double()
                        want = _attention_f64(q, kt, vt, None if mask is None else mask.view(-1), 0.3)
                        err = float((y - want).abs().max())
                        assert err <= 1e-5 * float(v.abs().max()), (isa, heads, kvh, d, S, mask is None, dtype, err)
    finally:
        torch.set_num_threads(old)


def test_ops_opcheck():
    from torch._library.simple_registry import singleton

    if any(singleton.find(f"hf_efficient::{n}").fake_impl.kernel is None
           for n in ("decode_attn_in", "decode_attn_out_mlp", "decode_linear", "decode_layers")):
        pytest.skip("the decode ops' fakes are not registered (they belong in hf_efficient/ops.py)")
    ops = torch.ops.hf_efficient
    H, d = 64, 16
    w = [torch.randn(64, H), torch.randn(32, H), torch.randn(32, H)]
    meta = [0, 0, H, 64, 0, 0, H, 32, 0, 0, H, 32]
    a = (torch.randn(1, 1, H), torch.ones(H), 1e-5, w, [None] * 3, [None] * 3, meta, torch.ones(d), torch.zeros(d),
         4, 2, d)
    torch.library.opcheck(ops.decode_attn_in.default, a)
    q, k, v = ops.decode_attn_in(*a)
    mw = [torch.randn(H, 64), torch.randn(96, H), torch.randn(96, H), torch.randn(H, 96)]
    mmeta = [0, 0, 64, H, 0, 0, H, 96, 0, 0, H, 96, 0, 0, 96, H]
    b = (q, torch.cat([k, k], 2), torch.cat([v, v], 2), None, 0.25, a[0], a[1], 1e-5, mw, [None] * 4, [None] * 4, mmeta)
    torch.library.opcheck(ops.decode_attn_out_mlp.default, b)
    # decode_layers: two layers = attn_in -> the cache concat -> attn_out_mlp per layer, bit for bit
    past = [torch.randn(1, 2, 3, d) for _ in range(4)]
    c = (a[0], [a[1], torch.ones(H) * 0.5] * 2, [1e-5, 1e-6] * 2, (w + mw) * 2, [None] * 14, [None] * 14,
         (meta + mmeta) * 2, a[7], a[8], None, 0.25, 4, 2, d, past[:2], past[2:])
    torch.library.opcheck(ops.decode_layers.default, c)
    h, keys, values = ops.decode_layers(*c)
    x = a[0]
    for i in range(2):
        q, k, v = ops.decode_attn_in(x, a[1], 1e-5, w, [None] * 3, [None] * 3, meta, a[7], a[8], 4, 2, d)
        k, v = torch.cat([past[i], k], -2), torch.cat([past[2 + i], v], -2)
        x = ops.decode_attn_out_mlp(q, k, v, None, 0.25, x, torch.ones(H) * 0.5, 1e-6, mw, [None] * 4, [None] * 4,
                                    mmeta)
        assert torch.equal(keys[i], k) and torch.equal(values[i], v)
    assert torch.equal(h, x)
    # strided pasts (same values) take at::cat instead of the copies that ride along with the q/k/v tiles
    strided = [p.transpose(2, 3).contiguous().transpose(2, 3) for p in past]
    assert not strided[0].is_contiguous()
    h2, keys2, values2 = ops.decode_layers(*c[:14], strided[:2], strided[2:])
    assert torch.equal(h2, h) and all(torch.equal(a, b) for a, b in zip(keys2 + values2, keys + values))
    with pytest.raises(RuntimeError, match="per layer"):
        ops.decode_layers(*c[:14], past[:2], past[2:3])
    with pytest.raises(RuntimeError, match="projections"):
        ops.decode_layers(*c[:3], c[3][:13], *c[4:])
    torch.library.opcheck(ops.decode_linear.default, (torch.randn(1, 1, H), torch.randn(40, H), torch.randn(40)))
    torch.library.opcheck(ops.decode_linear.default, (torch.randn(1, H), torch.randn(40, H), None))
    with pytest.raises(RuntimeError, match="one row"):
        ops.decode_linear(torch.randn(2, 1, H), torch.randn(40, H), None)
    with pytest.raises(RuntimeError, match="weight"):
        ops.decode_linear(torch.randn(1, 1, H), torch.randn(40, H + 1), None)


def test_whole_model_pickles(model_dirs, fused_calls, model_steps):
    """torch.save of a whole model: the switched classes are found by name, also before any was switched."""
    import io

    model = _load(model_dirs, "fp32")
    buf = io.BytesIO()
    torch.save(model, buf)
    switched = [type(model.model.layers[0]), type(model.model), type(model)]
    saved = [(c.__name__, c._hfe_base, decode._CLASSES.pop(c._hfe_base)) for c in switched]
    for name, _, _ in saved:
        del decode.__dict__[name]  # as in a fresh process
    try:
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert [type(again.model.layers[0]).__name__, type(again.model).__name__, type(again).__name__] == \
            [n for n, _, _ in saved]
        with torch.no_grad():
            a = again.generate(_ids(5), max_new_tokens=3, do_sample=False)
        assert len(fused_calls) == 2 * 2 and len(model_steps) == 2
        assert torch.equal(a, model.generate(_ids(5), max_new_tokens=3, do_sample=False))
    finally:
        for name, base, cls in saved:
            decode._CLASSES[base] = cls
            setattr(decode, name, cls)


def _decode_layers_args(mask=None):
    """decode_layers arguments: three layers of mixed projections (test_decode_layers_team_equals_loop)."""
    H, heads, kvh, d, inter, S = 80, 4, 2, 16, 96, 5
    gen = torch.Generator().manual_seed(0)
    layers = [[("int4_asym", 32)] * 7,
              [("nf4_asym", 32), None, ("int2_asym", 64), ("fp4_sym", 32), ("int3_asym", 32), None, ("int4_sym", 64)],
              [None] * 7]
    ws, grids, biases, meta, norms = [], [], [], [], []
    for li, spec in enumerate(layers):
        for j, (s, (n, k)) in enumerate(zip(spec, [(heads * d, H), (kvh * d, H), (kvh * d, H), (H, heads * d),
                                                   (inter, H), (inter, H), (H, inter)])):
            if s is None:
                ws.append(torch.randn(n, k, generator=gen) / k ** 0.5), grids.append(None), meta.extend([0, 0, k, n])
            else:
                lw = _qlayer(n, k, s[0], s[1], seed=10 * li + j)
                ws.append(lw.qweight), grids.append(lw.grid), meta.extend([lw.bits, lw.group_size, k, n])
            biases.append(torch.randn(n, generator=gen) if j < 3 and li == 1 else None)
        norms += [torch.rand(H, generator=gen) + 0.5, torch.rand(H, generator=gen) + 0.5]
    keys = [torch.randn(1, kvh, S, d, generator=gen) for _ in layers]
    values = [torch.randn(1, kvh, S, d, generator=gen) for _ in layers]
    m = None
    if mask == "bool":
        m = torch.tensor([True, False, True, True, True, True])
    elif mask == "float":
        m = torch.randn(S + 1, generator=gen)
    ang = torch.rand(d // 2, generator=gen).repeat(2)
    return (torch.randn(1, 1, H, generator=gen), norms, [1e-5, 1e-6] * 3, ws, grids, biases, meta, ang.cos(),
            ang.sin(), m, 0.25, heads, kvh, d, keys, values)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_layers_team_equals_loop(mask, monkeypatch):
    """decode_layers runs its layers as phases of one parallel region (split table builds, rotary, cache rows and
    attention); it gives the per-layer loop's hidden state and caches bit for bit (HF_EFFICIENT_DECODE_PATH=loop
    runs the loop, which test_ops_opcheck ties to the per-layer ops; =team the region or an error) at 1, 2 and 3
    threads, over three layers of mixed
    projections (bit-serial INT4/INT3/INT2, code-indexed NF4/FP4, float, q/k/v biases, a short last group)."""
    ops = torch.ops.hf_efficient
    args = _decode_layers_args(mask)
    keys, values = args[14:]
    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("HF_EFFICIENT_DECODE_PATH", "loop")
        h0, k0, v0 = ops.decode_layers(*args)
        monkeypatch.setenv("HF_EFFICIENT_DECODE_PATH", "team")
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            h, k, v = ops.decode_layers(*args)
            assert torch.equal(h, h0), threads
            assert all(torch.equal(a, b) for a, b in zip(k + v, k0 + v0)), threads
        # strided pasts (the same values) need the loop's at::cat: "team" refuses them, the default runs the loop
        strided = [p.transpose(2, 3).contiguous().transpose(2, 3) for p in keys]
        with pytest.raises(RuntimeError, match="per-layer loop"):
            ops.decode_layers(*args[:14], strided, values)
        monkeypatch.delenv("HF_EFFICIENT_DECODE_PATH")
        h, k, v = ops.decode_layers(*args[:14], strided, values)
        assert torch.equal(h, h0) and all(torch.equal(a, b) for a, b in zip(k + v, k0 + v0))
    finally:
        torch.set_num_threads(old)


def _collapse_supported() -> bool:
    import os
    import platform

    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    major, minor = (int(v) for v in platform.release().split(".")[:2])
    return os.name == "posix" and "[never]" not in thp and (major, minor) >= (6, 1)


def _anon_huge_kib(t: torch.Tensor) -> int:
    """AnonHugePages of the mappings that hold t's bytes (/proc/self/smaps)."""
    lo, hi, total, inside = t.data_ptr(), t.data_ptr() + t.nbytes, 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            a, b = (int(v, 16) for v in head.split("-"))
            inside = a < hi and b > lo
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def test_huge_pages_in_place():
    t = torch.randn(3 << 20)  # 12 MiB: at least five whole 2 MiB pages inside
    ref, ptr = t.clone(), t.data_ptr()
    small = torch.randn(1000)
    done = decode.huge_pages([t, t, small, t.double()[:10]])  # twice (tied), too small, not float32
    assert torch.equal(t, ref) and t.data_ptr() == ptr
    if not _collapse_supported():
        pytest.skip("no MADV_COLLAPSE here (Linux < 6.1 or THP off)")
    inside = (t.nbytes - (4 << 20)) // 1024  # KiB of the whole 2 MiB pages inside t (at least)
    assert inside * 1024 <= done <= t.nbytes + (4 << 20)  # the pages around t, once each
    assert _anon_huge_kib(t) >= inside


def test_enable_collapses_the_streamed_float_weights(model_dirs, monkeypatch):
    seen = []
    monkeypatch.setattr(decode, "huge_pages", lambda ws: seen.extend(ws))
    model = _load(model_dirs, "fp32")  # enable_fast_decode on this load
    enable_fast_decode(model)
    want = [p.weight for layer in model.model.layers for p in decode._modules(layer)] + [model.lm_head.weight]
    assert {w.data_ptr() for w in seen} == {w.data_ptr() for w in want}
    seen.clear()
    enable_fast_decode(model, False)
    assert seen == []


def _displaced(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that starts 16 bytes past a page boundary (as a loader, a deep copy or ``.to()`` may leave a
    weight)."""
    buf = torch.empty(t.nbytes + kernel.PAGE + 16, dtype=torch.uint8)
    off = (-buf.data_ptr()) % kernel.PAGE + 16
    return buf[off:off + t.nbytes].view(t.dtype).view(t.shape).copy_(t)


@pytest.mark.parametrize("case", ["fp32", "int4-g32", "nf4-g32"])
def test_enable_places_what_a_step_streams(model_dirs, case, fused_calls):
    """enable_fast_decode moves every weight a step streams (float projections and head, the LUT streams and the
    LUT head's copy) that does not start on a page boundary to one that does: same values, same Parameter objects,
    ties kept, the same greedy tokens; a second call moves nothing."""
    from hf_efficient.quantization.lut.layer import lut_layers

    model = _load(model_dirs, case)
    if case != "fp32":
        enable_lut(model, head_bits=8, head_group_size=32)
    floats = [p.weight for layer in model.model.layers for p in decode._modules(layer) if type(p) is nn.Linear]
    if type(model.lm_head) is nn.Linear:
        floats.append(model.lm_head.weight)
    layers = list(lut_layers(model))
    assert (len(floats), len(layers)) == ((15, 0) if case == "fp32" else (0, 15))  # 2 layers x 7 + the head
    for p in floats:
        p.data = _displaced(p.data)
    for q in layers:
        q.replace_layout_tensor("stream", _displaced(q.layout_tensor("stream")))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    values = [p.detach().clone() for p in floats] + [q.layout_tensor("stream").clone() for q in layers]
    assert not any(kernel.placed(t) for t in floats + [q.layout_tensor("stream") for q in layers])

    enable_fast_decode(model)
    streams = [q.layout_tensor("stream") for q in lut_layers(model)]
    assert all(kernel.placed(t) for t in floats + streams)
    assert all(torch.equal(a, b) for a, b in zip(values, floats + streams))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie (one Parameter) holds
    fused_calls.clear()
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert fused_calls
    ptrs = [t.data_ptr() for t in floats + streams]
    enable_fast_decode(model)
    assert [t.data_ptr() for t in floats + [q.layout_tensor("stream") for q in lut_layers(model)]] == ptrs


@pytest.mark.parametrize("path", ["loop", "team"])
def test_decode_layers_checks_and_releases(path, monkeypatch):
    """Both paths of decode_layers check x, cos/sin and the norm weights alike (one helper), and neither keeps the
    pasts it read once the call returns (the team's per-thread state is cleared)."""
    import weakref

    ops = torch.ops.hf_efficient
    monkeypatch.setenv("HF_EFFICIENT_DECODE_PATH", path)
    args = list(_decode_layers_args())
    bad = {0: (torch.randn(2, 1, 80), "one row"), 7: (torch.ones(15), "cos/sin"),
           1: ([torch.ones(79)] + args[1][1:], "norm_weight has 79 values")}
    for i, (v, msg) in bad.items():
        with pytest.raises(RuntimeError, match=msg):
            ops.decode_layers(*args[:i], v, *args[i + 1:])
    past = weakref.ref(args[14][0])
    h, k, v = ops.decode_layers(*args)
    assert torch.equal(k[0][:, :, :-1], args[14][0])
    args[14] = None
    del k
    assert past() is None


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_layers_inplace_equals_decode_layers(mask, monkeypatch):
    """decode_layers_inplace appends this token's row into the caller's buffers (row ``past``) and attends over
    rows [0, past]: the hidden state and the buffers' first past + 1 rows equal decode_layers' output and new caches
    bit for bit, on the one-region path at 1, 2 and 3 threads and on the per-layer loop; rows past the new one
    stay untouched; bad buffers are refused with the layer named."""
    ops = torch.ops.hf_efficient
    args = _decode_layers_args(mask)
    keys, values = args[14:]
    S = keys[0].shape[2]
    h0, k0, v0 = ops.decode_layers(*args)

    def buffers(spare):
        out = []
        for t in (*keys, *values):
            b = torch.full((1, t.shape[1], S + 1 + spare, t.shape[3]), float("nan"))
            b[:, :, :S] = t
            out.append(b)
        return out[:len(keys)], out[len(keys):]

    old = torch.get_num_threads()
    try:
        for path, threads in (("loop", 1), ("team", 1), ("team", 2), ("team", 3)):
            monkeypatch.setenv("HF_EFFICIENT_DECODE_PATH", path)
            torch.set_num_threads(threads)
            kb, vb = buffers(spare=2)
            h = ops.decode_layers_inplace(*args[:14], kb, vb, S, [], [])
            assert torch.equal(h, h0), (path, threads)
            for b, want in zip(kb + vb, k0 + v0):
                assert torch.equal(b[:, :, :S + 1], want) and b[:, :, S + 1:].isnan().all(), (path, threads)
    finally:
        torch.set_num_threads(old)
    monkeypatch.delenv("HF_EFFICIENT_DECODE_PATH")
    kb, vb = buffers(spare=0)  # exactly one free row
    torch.library.opcheck(ops.decode_layers_inplace.default, (*args[:14], kb, vb, S, [], []))
    kb, vb = buffers(spare=0)
    assert torch.equal(ops.decode_layers_inplace(*args[:14], kb, vb, S, [], []), h0)
    full = [b[:, :, :S] .contiguous() for b in kb]
    with pytest.raises(RuntimeError, match="layer 0's buffers must be contiguous float32"):
        ops.decode_layers_inplace(*args[:14], full, vb, S, [], [])  # no free row
    with pytest.raises(RuntimeError, match="layer 1's buffers"):
        ops.decode_layers_inplace(*args[:14], [kb[0], kb[1].double(), kb[2]], vb, S, [], [])
    with pytest.raises(RuntimeError, match="one tensor"):
        ops.decode_layers_inplace(*args[:14], kb, [vb[0], kb[1], vb[2]], S, [], [])
    with pytest.raises(RuntimeError, match="per layer"):
        ops.decode_layers_inplace(*args[:14], kb, vb[:2], S, [], [])


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_decode_layers_inplace_float16_copies(mask, monkeypatch):
    """With float16 copies of the buffers, decode_layers_inplace writes this token's row into both (the copy's
    row is the float32 row rounded to nearest) and attends over the copies: every copy holds its buffer's rows
    [0, past] in float16 exactly and nothing past them; the result is the same bit for bit on the per-layer loop and
    the one-region path at 1-3 threads, and within float16 rounding of the float32 result (layer 0's new rows,
    which precede any attention, equal it exactly); bad copies are refused."""
    ops = torch.ops.hf_efficient
    args = _decode_layers_args(mask)
    keys, values = args[14:]
    L, S = len(keys), keys[0].shape[2]
    h0, k0, v0 = ops.decode_layers(*args)

    def buffers():
        bufs = []
        for t in (*keys, *values):
            b = torch.full((1, t.shape[1], S + 3, t.shape[3]), float("nan"))
            b[:, :, :S] = t
            bufs.append(b)
        halves = [b.half() for b in bufs]
        return bufs[:L], bufs[L:], halves[:L], halves[L:]

    results = []
    old = torch.get_num_threads()
    try:
        for path, threads in (("loop", 1), ("team", 1), ("team", 2), ("team", 3)):
            monkeypatch.setenv("HF_EFFICIENT_DECODE_PATH", path)
            torch.set_num_threads(threads)
            kb, vb, kh, vh = buffers()
            h = ops.decode_layers_inplace(*args[:14], kb, vb, S, kh, vh)
            for b, c in zip(kb + vb, kh + vh):
                assert torch.equal(c[:, :, :S + 1], b[:, :, :S + 1].half()), (path, threads)
                assert c[:, :, S + 1:].isnan().all() and b[:, :, S + 1:].isnan().all(), (path, threads)
            assert torch.equal(kb[0][:, :, :S + 1], k0[0]) and torch.equal(vb[0][:, :, :S + 1], v0[0])
            results.append((h, kb, vb))
    finally:
        torch.set_num_threads(old)
    h, kb, vb = results[0]
    for h2, kb2, vb2 in results[1:]:
        assert torch.equal(h2, h)
        assert all(torch.equal(a[:, :, :S + 1], b[:, :, :S + 1]) for a, b in zip(kb + vb, kb2 + vb2))
    err = float((h - h0).abs().max() / h0.abs().max())
    assert 0 < err < 1e-2, err
    monkeypatch.delenv("HF_EFFICIENT_DECODE_PATH")
    kb, vb, kh, vh = buffers()
    torch.library.opcheck(ops.decode_layers_inplace.default, (*args[:14], kb, vb, S, kh, vh))
    kb, vb, kh, vh = buffers()
    with pytest.raises(RuntimeError, match="one key and one value copy per layer"):
        ops.decode_layers_inplace(*args[:14], kb, vb, S, kh, vh[:1])
    with pytest.raises(RuntimeError, match="layer 1's buffers .* float16 copies"):
        ops.decode_layers_inplace(*args[:14], kb, vb, S, [kh[0], kh[1].float(), kh[2]], vh)
    with pytest.raises(RuntimeError, match="layer 0's buffers"):
        ops.decode_layers_inplace(*args[:14], kb, vb, S, [kh[0][:, :, :S + 1].contiguous()] + kh[1:], vh)
    with pytest.raises(RuntimeError, match="float16 copies are one tensor"):
        ops.decode_layers_inplace(*args[:14], kb, vb, S, kh, [kh[0]] + vh[1:])


def test_float16_kv_copies_through_the_model(model_dirs, stacked_steps):
    """enable_fast_decode(kv_cache="float16"): the stacked step keeps float16 copies beside the cache's float32
    buffers and attends over them. The cache layers still hold float32 views (what transformers reads), whose
    float16 rounding the copies hold exactly; teacher-forced logits stay near the float32 cache's; a bad choice is
    refused, and kv_cache="float32" (the default) makes buffers without copies again."""
    from transformers import DynamicCache

    model = _load(model_dirs, "fp32")
    ids = _ids(6)

    def run():
        cache = DynamicCache(config=model.config)
        logits = []
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            for t in range(10):
                logits.append(model(ids[:, t % 6:t % 6 + 1], past_key_values=cache, use_cache=True).logits[0, -1])
        return torch.stack(logits), cache

    n = len(stacked_steps)
    want, c32 = run()
    assert decode._KV_OF[c32].kh == []
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        enable_fast_decode(model, kv_cache="bfloat16")
    enable_fast_decode(model, kv_cache="float16")
    got, c16 = run()
    assert len(stacked_steps) == n + 20
    kv = decode._KV_OF[c16]
    assert len(kv.kh) == len(kv.vh) == model.config.num_hidden_layers
    for layer, kh, vh in zip(c16.layers, kv.kh, kv.vh):
        S = layer.keys.shape[2]
        assert layer.keys.dtype == torch.float32 and S == 16
        assert torch.equal(kh[:, :, :S], layer.keys.half()) and torch.equal(vh[:, :, :S], layer.values.half())
    err = float((got - want).abs().max() / want.abs().max())
    assert 0 < err < 1e-2, err
    enable_fast_decode(model)
    again, c = run()
    assert torch.equal(again, want) and decode._KV_OF[c].kh == []


def test_generate_appends_the_cache_in_place(model_dirs, stacked_steps, monkeypatch):
    """generate on a DynamicCache: the stacked step appends each token into buffers with spare rows, so the cache
    layers hold views whose storage stays put until the buffers fill, then moves to larger ones (the past copied
    once); tokens and caches equal those of the copying path bit for bit, also when generation continues after the
    cache was cropped (the layers no longer hold the views handed out, so the buffers are made anew)."""
    from transformers import DynamicCache

    model = _load(model_dirs, "int4-g32")
    monkeypatch.setattr(decode, "KV_SPARE_MIN", 3)  # small buffers: several refills in a short generation
    ids = _ids(6)

    def run():
        cache = DynamicCache(config=model.config)
        storages = []
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            toks = [tok]
            for step in range(12):
                if step == 8:
                    cache.crop(-2)
                out = model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                toks.append(tok)
                k = cache.layers[0].keys
                storages.append((k.untyped_storage().data_ptr(), k.untyped_storage().nbytes() > 4 * k.numel()))
        return torch.cat(toks, 1), cache, storages

    n = len(stacked_steps)
    got, cache, storages = run()
    assert len(stacked_steps) == n + 12
    with monkeypatch.context() as mp:
        mp.setattr(decode, "_kv_buffers", lambda *a: None)
        want, c2, copied = run()
    assert torch.equal(got, want)
    for a, b in zip(cache.layers, c2.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert not any(spare for _, spare in copied)  # the copying path: compact tensors (cat's)
    # 6 prompt positions: buffers of 6 + 1 + 3 rows take the steps at lengths 6..9, then 10 + 1 + 3 rows ...
    ptrs = [ptr for ptr, _ in storages]
    moves = sum(a != b for a, b in zip(ptrs, ptrs[1:]))
    assert ptrs[0] == ptrs[3] != ptrs[4] and 2 <= moves <= 4, ptrs
    assert ptrs[8] != ptrs[7]  # the crop: new buffers
