"""A fused CPU decode step for Llama-style decoder layers: :func:`enable_fast_decode`.

One decode token of a decoder layer in eager transformers is a long chain of small ATen ops and their Python
(norms, rotary, reshapes, the projections' wrappers, residuals), which costs more than its matmuls on a small
model (measurements in ``docs/lut.md``). This module runs such a step in two C++ ops (``csrc/decode_step.cpp``) around the cache update, which stays the
Cache object's own (``DynamicCache``, ``StaticCache``, ... all keep working)::

    q, k, v = decode_attn_in(x, ...)               # RMSNorm, q/k/v projections (+bias), rotary
    k_all, v_all = cache.update(k, v, layer_idx)   # as the HF attention does
    x = decode_attn_out_mlp(q, k_all, v_all, ...)  # attention, o_proj, residual, RMSNorm, SwiGLU MLP, residual

Projections are LUT streams (QuantLinear layers on the ``cpu-lut`` layout, see :mod:`.layer`) or plain float32
``nn.Linear`` weights, so an fp32 model gets the same path. q/k/v (and gate/up) that share a table geometry
build the activation tables once.

:func:`enable_fast_decode` switches each supported decoder layer's class in place (as :class:`.layer.LUTHead`
does): parameters, buffers, state dict, saving and peft see the same module. The fused forward runs only for
a no-grad, eval-mode, CPU, float32 forward of **one token of batch 1**, with the ``sdpa`` or ``eager``
attention, no attention-weight capture, and every projection a float ``nn.Linear`` or a LUT-enabled
QuantLinear, not under ``reference_only()`` or ``torch.compile``; anything else (prefill, batch > 1, training,
LoRA-wrapped projections, bf16, another attention function) calls the layer's own forward. A mask (static caches,
eager attention) is applied; its last dimension must be the cache length.
"""
from __future__ import annotations

import ctypes
import logging
import weakref
from operator import is_

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...heap import glibc_function
from ...kernels import lut_cpu as kernel
from .. import linear as _linear
from ..linear import QuantLinear
from .layer import _cached_weight, lut_layers, place_stream

logger = logging.getLogger(__name__)

# Decoder layers whose forward is RMSNorm -> attention (q/k/v/o, rotary, GQA) -> residual -> RMSNorm -> SwiGLU
# MLP -> residual, with the attention module's forward as Llama's (Mistral and Qwen2 differ only in a sliding
# window, which keeps such layers on their own forward, and Qwen2's q/k/v biases).
SUPPORTED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# Their decoder stacks, whose forward (embedding, positions, causal mask, rotary, layers, norm) the fused model step
# reproduces for one token when every layer is switched and no layer slides (Mistral's and Qwen2's sliding masks)
SUPPORTED_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")
# Their causal LMs, switched with their decoder stack: a one-token step's float32 output head runs on the ops' own
# GEMV (torch's F.linear reads it far below the memory bandwidth here; docs/lut.md)
SUPPORTED_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_HOME = {"LlamaDecoderLayer": "llama", "MistralDecoderLayer": "mistral", "Qwen2DecoderLayer": "qwen2",
         "LlamaModel": "llama", "MistralModel": "mistral", "Qwen2Model": "qwen2",
         "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ATTENTIONS = ("sdpa", "eager")

try:  # transformers >= 5: output capture (output_attentions) through hooks and a context variable
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers pass output_attentions to the layer
    _active_collector = None

_WARNED: set = set()
_OPS: list = []


def _ops():
    if not _OPS:
        ops = kernel.ops()
        _OPS.extend([ops.decode_attn_in.default, ops.decode_attn_out_mlp.default])
    return _OPS


class _Plan:
    """What the two ops read for one layer, with the watch (:class:`_Watch`) of what it was built from."""

    __slots__ = ("watch", "attn_in", "attn_out", "n1", "eps1", "n2", "eps2", "heads", "kv_heads", "head_dim",
                 "scaling", "layer_idx", "config", "cfg_dict")


def _proj(m: nn.Module):
    """(weight, grid, bias, meta) of one projection for the ops, or None if the fused step cannot run it."""
    if type(m) is nn.Linear:
        w = m.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or (m.bias is not None and m.bias.dtype != w.dtype):
            return None
        return w, None, m.bias, [0, 0, m.in_features, m.out_features]
    if type(m) is QuantLinear and m.act_fmt is None and m.__dict__.get("_lut_enabled", True):
        w = _cached_weight(m)
        if w is None:
            return None
        bias = None if m.bias is None else m.bias.detach().float()
        return w.qweight, w.grid, bias, [w.bits, w.group_size, w.in_features, w.out_features]
    return None


_MADV_COLLAPSE = 25  # Linux madvise advice (not exported by Python's os module for plain memory)
_HUGE = 2 << 20
_HUGE_MIN_BYTES = 256 << 10  # smaller weights (test models) are left alone: a collapse costs milliseconds


def huge_pages(weights) -> int:
    """Back CPU weights that every decode step streams (float32 weights, LUT streams) with 2 MiB pages, in place
    (Linux >= 6.1: ``madvise(MADV_COLLAPSE)`` on each 2 MiB page of the aligned span around each weight, so a small
    weight's neighbours in the same pages are collapsed too; the tensors, their storage and values stay as they
    are, and where the memory or the kernel does not allow it nothing happens). No ``MADV_HUGEPAGE``: that would
    flag the whole mappings around the weights (other allocations too) for khugepaged and for huge pages at fault
    time.

    LUT streams are packed into huge pages (``hugepage_empty``), but a deep copy or ``.to()`` puts them anywhere;
    float weights from the loader sit in 4 KiB pages, where a DRAM-bound GEMV pays a page walk every 4 KiB and the
    prefetcher stops at each page (docs/lut.md, fused decode round 7). Returns the bytes collapsed (a page that
    crosses into another mapping, file-backed memory or an older kernel stay as they are).
    """
    madvise = glibc_function("madvise")
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pages = set()  # once each, for tied and neighbouring weights
    for w in weights:
        if w.device.type != "cpu" or w.nbytes < _HUGE_MIN_BYTES:
            continue
        lo = w.data_ptr() // _HUGE * _HUGE
        hi = -(-(w.data_ptr() + w.nbytes) // _HUGE) * _HUGE
        pages.update(range(lo, hi, _HUGE))
    return sum(_HUGE for a in sorted(pages) if madvise(a, _HUGE, _MADV_COLLAPSE) == 0)


def place_streams(model: nn.Module, weights) -> int:
    """Put what every decode step streams where it is read fastest: the float32 ``weights`` and the LUT streams
    of ``model`` (:func:`~hf_efficient.quantization.lut.layer.lut_layers`) start on a page boundary (moved there
    if a loader, a deep copy or ``.to()`` left them elsewhere: a Parameter stays the same object, its ``.data``
    moves; docs/lut.md, round 12), then :func:`huge_pages` backs them with 2 MiB pages. Returns its bytes."""
    for p in weights:  # a tied weight is placed at its first occurrence
        if p.dtype == torch.float32 and p.device.type == "cpu" and not kernel.placed(p):
            p.data = kernel.stream_copy(p.detach())
    streams = []
    for q in lut_layers(model):
        place_stream(q)
        streams.append(q.layout_tensor("stream"))
    return huge_pages([*weights, *streams])


def _modules(layer: nn.Module):
    a, mlp = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


class _Watch:
    """Where the inputs of a plan live, checked every step in a few C-level loops (no Python call per entry):
    ``dicts[i].get(names[i]) is objs[i]`` for every entry (submodules, the projections' weights or LUT streams
    and biases, their ``_lut_enabled`` flags, the norm weights, the attention's config and layer index) and
    ``type(mods[i]) is types[i]``. Objects are held, so ids are never reused while the watch lives; a replaced
    module, weight, stream (a re-conversion, ``.to()``) or config makes it fail and the plan is rebuilt."""

    __slots__ = ("dicts", "names", "objs", "mods", "types")

    def __init__(self):
        self.dicts, self.names, self.objs, self.mods, self.types = [], [], [], [], []

    def add(self, d: dict, *names):
        for n in names:
            self.dicts.append(d)
            self.names.append(n)
            self.objs.append(d.get(n))

    def module(self, m):
        self.mods.append(m)
        self.types.append(type(m))

    def holds(self) -> bool:
        return (all(map(is_, map(type, self.mods), self.types))
                and all(map(is_, map(dict.get, self.dicts, self.names), self.objs)))

    def extend(self, other: "_Watch"):
        for a, b in zip((self.dicts, self.names, self.objs, self.mods, self.types),
                        (other.dicts, other.names, other.objs, other.mods, other.types)):
            a.extend(b)


def _watch(layer: nn.Module) -> _Watch:
    """The watch of everything a layer's plan reads (what decides whether it can be reused)."""
    w = _Watch()
    lm = layer.__dict__["_modules"]
    w.add(lm, "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    attn, mlp = lm["self_attn"], lm["mlp"]
    w.add(attn.__dict__, "config", "layer_idx")
    for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj",
                                                                                      "down_proj"))):
        pm = parent.__dict__["_modules"]
        w.add(pm, *names)
        for n in names:
            m = pm[n]
            w.module(m)
            d = m.__dict__
            if type(m) is QuantLinear:
                w.add(d, "_lut_enabled")
                w.add(d["_buffers"], "_rl_stream", "bias")
                w.add(d["_parameters"], "bias")
            elif type(m) is nn.Linear:
                w.add(d["_parameters"], "weight", "bias")
    for n in ("input_layernorm", "post_attention_layernorm"):
        w.add(lm[n].__dict__["_parameters"], "weight")
    return w


def _build_plan(layer: nn.Module, mods) -> _Plan | None:
    projs = [_proj(m) for m in mods]
    if any(p is None for p in projs):
        return None
    a = layer.self_attn
    p = _Plan()
    p.attn_in = tuple(list(x) for x in zip(*projs[:3]))
    p.attn_out = tuple(list(x) for x in zip(*projs[3:]))
    p.attn_in = (*p.attn_in[:3], [v for m in p.attn_in[3] for v in m])
    p.attn_out = (*p.attn_out[:3], [v for m in p.attn_out[3] for v in m])
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    p.n1, p.eps1 = n1.weight, float(n1.variance_epsilon)
    p.n2, p.eps2 = n2.weight, float(n2.variance_epsilon)
    cfg = a.config
    p.heads, p.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    p.head_dim, p.scaling, p.layer_idx = a.head_dim, float(a.scaling), a.layer_idx
    p.config = cfg
    # the config's own dict, read every step without transformers' __getattribute__ (a Python call)
    p.cfg_dict = object.__getattribute__(cfg, "__dict__")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (p.n1, p.n2)):
        return None
    return p


def _plan(layer: nn.Module) -> _Plan | None:
    plan = layer.__dict__.get("_hfe_plan")
    if plan is not None and plan.watch.holds():
        return plan if type(plan) is _Plan else None
    plan = _build_plan(layer, _modules(layer))
    # building may convert a QuantLinear to the kernel layout (a new stream): watch what the plan holds; a layer
    # that cannot run fused is remembered too, until one of its projections changes
    if plan is None:
        plan = _Unsupported()
    plan.watch = _watch(layer)
    layer.__dict__["_hfe_plan"] = plan
    return plan if type(plan) is _Plan else None


class _Unsupported:
    __slots__ = ("watch",)


_ONE = (1, 1)
_MISSING = object()


def _blocked(hidden_states) -> bool:
    """True when no fused step may run for this call, whatever the layer (grad, dtype, compile, ...)."""
    return (torch.is_grad_enabled() or hidden_states.dtype != torch.float32 or not hidden_states.is_cpu
            or hidden_states.dim() != 3 or hidden_states.shape[:2] != _ONE
            or getattr(_linear._state, "reference_only", False)
            or torch.compiler.is_compiling())  # compiled graphs trace the modules' own forwards


def _impl_ok(plan: _Plan) -> bool:
    impl = plan.cfg_dict.get("_attn_implementation_internal", _MISSING)
    if impl is _MISSING:
        impl = plan.config._attn_implementation
    return impl in ATTENTIONS


def _capturing_attentions() -> bool:
    if _active_collector is None:
        return False
    col = _active_collector.get()
    return col is not None and "attentions" in col


def _mask_ok(mask) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == 1
                            and mask.shape[2] == 1 and mask.dtype in (torch.bool, torch.float32))


def _run_layer(plan: _Plan, hidden_states, mask, cos, sin, cache, extra):
    """One fused decoder-layer step (every fused step of a layer, from the layer or the model, runs here)."""
    attn_in, attn_out = _ops()
    q, k, v = attn_in(hidden_states, plan.n1, plan.eps1, *plan.attn_in, cos, sin, plan.heads, plan.kv_heads,
                      plan.head_dim)
    if cache is not None:
        k, v = cache.update(k, v, plan.layer_idx, kwargs=extra)
    return attn_out(q, k, v, mask, plan.scaling, hidden_states, plan.n2, plan.eps2, *plan.attn_out)


def _fast_step(layer, hidden_states, args, kwargs):
    """The fused step's output, or None when the layer's own forward must run (nothing is changed then)."""
    if args or layer.training or _blocked(hidden_states) or kwargs.get("output_attentions"):
        return None
    pe = kwargs.get("position_embeddings")
    if pe is None:
        return None
    plan = _plan(layer)
    if plan is None or not _impl_ok(plan) or _capturing_attentions():
        return None
    mask = kwargs.get("attention_mask")
    if not _mask_ok(mask):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    extra = None if cache is None else {k: v for k, v in kwargs.items() if k not in _LAYER_KWARGS}
    return _run_layer(plan, hidden_states, mask, pe[0], pe[1], cache, extra)


# keyword arguments of the decoder layer that its attention takes by name, so they are not in the kwargs it
# forwards to cache.update(kwargs=...)
_LAYER_KWARGS = frozenset(("attention_mask", "cache", "past_key_values", "position_embeddings"))


class _FastDecodeMixin:
    """Decoder layer forward that runs one decode token fused (see the module docstring), else the original."""

    def forward(self, hidden_states, *args, **kwargs):
        out = _fast_step(self, hidden_states, args, kwargs)
        if out is not None:
            return out
        return super().forward(hidden_states, *args, **kwargs)


# keyword arguments the decoder stack's fused step understands (generate passes the first seven); any other one
# (e.g. flash-attention kwargs, a cache_position) sends the call to the model's own forward
_MODEL_KWARGS = frozenset(("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                           "use_cache", "return_dict", "output_attentions", "output_hidden_states"))
_PASSED_ON = ("output_attentions", "output_hidden_states")  # what the model's forward hands on to its layers
# rotary modules whose forward is cos/sin(position * inv_freq) * attention_scaling (rope types other than the
# dynamic and longrope ones, which update inv_freq on the fly)
_ROTARIES = ("LlamaRotaryEmbedding", "MistralRotaryEmbedding", "Qwen2RotaryEmbedding")


def _hooked(m: nn.Module) -> bool:
    # transformers' output-capture hooks (installed for good by the first output_attentions/hidden_states call)
    # do nothing without an active collector, which the model step requires; any other hook keeps the module call
    return bool(m._forward_pre_hooks) or any(getattr(h, "__name__", None) != "output_capturing_hook"
                                             for h in m._forward_hooks.values())


def _rope(rot: nn.Module, h, position_ids, pos: int):
    """``rot(h, position_ids)`` for one position: the same float32 ops, without the module call's overhead."""
    rt = getattr(rot, "rope_type", None)
    inv = rot.__dict__["_buffers"].get("inv_freq")
    if (type(rot).__name__ not in _ROTARIES or not isinstance(rt, str) or "dynamic" in rt or rt == "longrope"
            or _hooked(rot) or inv is None or inv.dtype != torch.float32 or not inv.is_cpu):
        return rot(h, position_ids)
    freqs = inv * float(pos)  # what position_ids.float() * inv_freq gives (an exact float32 product)
    emb = torch.cat((freqs, freqs)).view(1, 1, -1)
    s = rot.attention_scaling
    return emb.cos() * s, emb.sin() * s


def _plain_dynamic(cache) -> bool:
    return type(cache) is DynamicCache and all(type(x) is DynamicLayer for x in cache.layers)


def _no_padding(mask, past: int) -> bool:
    """No attention mask, or a 2-D one over the cache and the new token that masks nothing (what generate passes
    without padding): transformers' sdpa mask is None for both with one query, so it need not be built (docs/lut.md)."""
    return mask is None or (isinstance(mask, torch.Tensor) and mask.shape == (1, past + 1)
                            and mask.dtype in (torch.bool, torch.int64, torch.int32) and bool(mask.all()))


def _fast_model_step(model, args, kwargs):
    """The decoder stack's output for one decode token of batch 1, its layers run fused where they can, or None
    when the model's own forward must run (nothing is changed then). Same inputs to every layer as the model's
    forward gives them: embedding, position, mask, rotary and the cache's own update."""
    kwargs = _ids_from_args(args, kwargs)
    if kwargs is None or model.training or torch.is_grad_enabled() or not _MODEL_KWARGS.issuperset(kwargs):
        return None
    cfg = model.config
    for k in _PASSED_ON:  # output capture goes through hooks set up by the model's own forward
        if kwargs[k] if k in kwargs else getattr(cfg, k, False):
            return None
    if not kwargs.get("return_dict", getattr(cfg, "return_dict", True)):
        return None
    ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if ((ids is None) == (emb is None) or not isinstance(cache, Cache) or isinstance(mask, dict)
            or cfg._attn_implementation not in ATTENTIONS or _global_hooks() or _capturing()):
        return None
    if ids is not None and not (isinstance(ids, torch.Tensor) and ids.shape == _ONE):
        return None
    layers = list(model.layers._modules.values())[: cfg.num_hidden_layers]  # (slicing builds a ModuleList)
    if any(_hooked(m) for m in layers):
        return None
    h = emb if emb is not None else model.embed_tokens(ids)
    if _blocked(h):
        return None
    position_ids = kwargs.get("position_ids")
    past = cache.get_seq_length()
    if position_ids is None:
        pos, position_ids = past, torch.tensor([[past]], device=h.device)
    elif isinstance(position_ids, torch.Tensor) and position_ids.shape == _ONE:
        pos = int(position_ids)
    else:
        return None
    plain = _plain_dynamic(cache)
    if pos == past and cfg._attn_implementation == "sdpa" and plain and _no_padding(mask, past):
        mask = None  # create_causal_mask gives None here: the one query sees every cached position (tested)
    elif not (isinstance(mask, torch.Tensor) and mask.dim() == 4):  # a 4-D mask is used as it is
        mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=mask, cache=cache,
                                  position_ids=position_ids)
    if not _mask_ok(mask):
        return None
    pe = _rope(model.rotary_emb, h, position_ids, pos)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(cfg, "use_cache", None)
    rest = {k: kwargs[k] for k in _PASSED_ON if k in kwargs}
    extra = {"position_ids": position_ids, "use_cache": use_cache, **rest}  # the attention's cache.update kwargs
    cos, sin = pe
    stack = _stack_plan(model, layers, cache) if plain and not cache.offloading else None
    if stack is not None:
        h = _run_layers(stack, h, mask, cos, sin, cache)
        return BaseModelOutputWithPast(last_hidden_state=model.norm(h), cache=cache)
    for layer in layers:
        plan = _plan(layer) if isinstance(layer, _FastDecodeMixin) and not layer.training else None
        if plan is not None and plan.config is cfg:
            h = _run_layer(plan, h, mask, cos, sin, cache, extra)
        else:
            h = layer(h, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                      position_embeddings=pe, **rest)
    return BaseModelOutputWithPast(last_hidden_state=model.norm(h), cache=cache)


class _Stack:
    """The ``decode_layers`` arguments of a decoder stack, built from its layers' plans, with the watch of the
    layers, their training flags and everything their plans read (reused while it holds: no per-layer plan check
    per step)."""

    __slots__ = ("layers", "cfg", "watch", "n", "args", "scaling", "heads", "kv_heads", "head_dim", "half_kv")


def _stack_plan(model, layers, cache) -> _Stack | None:
    """The stack's ``decode_layers`` arguments when every layer runs fused on this config with one attention
    geometry and its plain ``DynamicCache`` layer holds a (1, kv_heads, past, head_dim) past, else None (each layer
    then runs on its own, its cache updated by ``cache.update``)."""
    cfg, cl, n = model.config, cache.layers, len(layers)
    if len(cl) < n or not all(c.is_initialized and c.keys.dim() == 4 and c.values.dim() == 4 for c in cl[:n]):
        return None
    st = model.__dict__.get("_hfe_stack")
    if st is not None and st.cfg is cfg and st.n == n and all(map(is_, layers, st.layers)) and st.watch.holds():
        return st
    plans = []
    for i, layer in enumerate(layers):
        plan = _plan(layer) if isinstance(layer, _FastDecodeMixin) and not layer.training else None
        if plan is None or plan.config is not cfg or plan.layer_idx != i:
            return None
        plans.append(plan)
    p0 = plans[0]
    geo = (p0.scaling, p0.heads, p0.kv_heads, p0.head_dim)
    if any((p.scaling, p.heads, p.kv_heads, p.head_dim) != geo for p in plans):
        return None
    st = _Stack()
    st.layers, st.cfg, st.n = tuple(layers), cfg, n
    st.watch = _Watch()
    for layer, p in zip(layers, plans):
        st.watch.module(layer)  # still a fused class
        st.watch.add(layer.__dict__, "training")
        st.watch.extend(p.watch)
    st.scaling, st.heads, st.kv_heads, st.head_dim = geo
    lists = [[v for p in plans for v in p.attn_in[j] + p.attn_out[j]] for j in range(4)]  # weights, grids, ...
    st.half_kv = model.__dict__.get("_hfe_kv_cache") == "float16"
    st.args = ([t for p in plans for t in (p.n1, p.n2)], [e for p in plans for e in (p.eps1, p.eps2)], *lists)
    model.__dict__["_hfe_stack"] = st
    return st


def _run_layers(stack: _Stack, h, mask, cos, sin, cache):
    """Every layer's fused step in one call; each cache layer gets what ``DynamicLayer.update`` would have stored
    (``torch.cat((keys, k), -2)``): appended in place into the cache's buffers (``decode_layers_inplace``) where it
    has them or can have them, else computed by ``decode_layers``."""
    cl = cache.layers
    n = stack.n
    keys, values = [c.keys for c in cl[:n]], [c.values for c in cl[:n]]
    kv = _kv_buffers(cache, keys, values, stack.half_kv)
    if kv is None:
        h, keys, values = _layers_op()(h, *stack.args, cos, sin, mask, stack.scaling, stack.heads, stack.kv_heads,
                                       stack.head_dim, keys, values)
    else:
        past = keys[0].shape[-2]
        h = kernel.ops().decode_layers_inplace.default(h, *stack.args, cos, sin, mask, stack.scaling, stack.heads,
                                                       stack.kv_heads, stack.head_dim, kv.kb, kv.vb, past, kv.kh,
                                                       kv.vh)
        # the views of rows [0, past], two per layer and token: as_strided dispatches faster than narrow
        b0 = kv.kb[0]
        size, stride = (1, b0.shape[1], past + 1, b0.shape[3]), b0.stride()
        keys = kv.k = [b.as_strided(size, stride) for b in kv.kb]
        values = kv.v = [b.as_strided(size, stride) for b in kv.vb]
    for c, k, v in zip(cl, keys, values):
        c.keys, c.values = k, v
    return h


class _KV:
    """A cache's keys and values in buffers with spare rows, which ``decode_layers_inplace`` appends to: each cache
    layer holds views of its buffers' first rows (``k``, ``v``: the views handed out last). A token then costs no
    copy of the past; ``DynamicLayer.update``'s cat copies every layer's whole cache per token (its cost grows with
    the length: docs/lut.md, round 9). ``kh``, ``vh``: float16 copies of the buffers, which the op appends to as
    well and attends over instead (half the bytes a token reads; ``[]`` for none)."""

    __slots__ = ("kb", "vb", "kh", "vh", "k", "v")


# Per cache object, so that a cache nobody holds frees its buffers; kept off the cache itself, so that copies and
# pickles of a cache carry only its layers' tensors.
_KV_OF: "weakref.WeakKeyDictionary[Cache, _KV]" = weakref.WeakKeyDictionary()
# Rows a cache's buffers get beyond the current length when they are (re)made: a quarter more, at least 32, so the
# copy into new buffers happens once per quarter of the length (amortized: 4 rows a token) and costs little memory.
KV_SPARE_MIN, KV_SPARE_FRACTION = 32, 4


def _kv_buffers(cache, keys, values, half: bool) -> _KV | None:
    """The cache's buffers for this step's in-place append (with float16 copies if ``half``), made (with the past
    copied in) where the cache layers do not hold the views handed out last step (first step, another code path
    updated or replaced them, a crop), or they are full; None where the pasts are not alike float32 CPU
    (1, kv_heads, past, head_dim) tensors."""
    kv = _KV_OF.get(cache)
    past = keys[0].shape[-2]
    if (kv is not None and len(kv.k) == len(keys) and all(map(is_, keys, kv.k)) and all(map(is_, values, kv.v))
            and past < kv.kb[0].shape[2] and bool(kv.kh) == half):
        return kv
    k0 = keys[0]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or t.shape != k0.shape or t.shape[0] != 1
           for t in (*keys, *values)):
        _KV_OF.pop(cache, None)
        return None
    cap = past + 1 + max(KV_SPARE_MIN, past // KV_SPARE_FRACTION)
    kv = _KV()
    kv.kb, kv.vb, kv.kh, kv.vh = [], [], [], []
    for bufs, halves, src in ((kv.kb, kv.kh, keys), (kv.vb, kv.vh, values)):
        for t in src:
            b = t.new_empty(1, t.shape[1], cap, t.shape[3])
            b[:, :, :past].copy_(t)
            bufs.append(b)
            if half:
                h = b.new_empty(b.shape, dtype=torch.float16)
                h[:, :, :past].copy_(t)  # rounded to nearest, as the op rounds each new row
                halves.append(h)
    kv.k, kv.v = list(keys), list(values)
    _KV_OF[cache] = kv
    return kv


def _layers_op():
    return kernel.ops().decode_layers.default


_LM_KWARGS = _MODEL_KWARGS | {"labels", "logits_to_keep"}


def _fast_lm_step(lm, args, kwargs):
    """A causal LM's output for one decode token of batch 1: the decoder stack's fused step called directly (no
    module call, no second output object) where it runs, else the stack's module call; a plain float32
    ``nn.Linear`` head on the ``decode_linear`` op, any other head (a ``LUTHead``, a hooked head) by its module
    call, as the LM's own forward does; or None (the LM's own forward runs)."""
    kwargs = _ids_from_args(args, kwargs)
    if kwargs is None or lm.training or torch.is_grad_enabled() or not _LM_KWARGS.issuperset(kwargs):
        return None
    if kwargs.get("labels") is not None or kwargs.get("logits_to_keep", 0) not in (0, 1):
        return None
    if not kwargs.get("return_dict", getattr(lm.config, "return_dict", True)):
        return None
    mods = lm.__dict__["_modules"]
    head, stack = mods.get("lm_head"), mods.get("model")
    ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if not isinstance(head, nn.Module) or not isinstance(stack, nn.Module):
        return None
    x = ids if ids is not None else emb
    if not isinstance(x, torch.Tensor) or x.shape[:2] != _ONE or (emb is not None and x.dim() != 3):
        return None
    inner = {k: v for k, v in kwargs.items() if k not in ("labels", "logits_to_keep")}
    out = None
    if isinstance(stack, _FastDecodeModelMixin) and not _hooked(stack):
        out = _fast_model_step(stack, (), inner)
    if out is None:
        out = stack(**inner)
    h = out.last_hidden_state  # one position: logits_to_keep 0 and 1 keep it alike
    if (type(head) is nn.Linear and not _hooked(head) and h.dtype == torch.float32 and h.shape[:2] == _ONE
            and head.weight.dtype == torch.float32 and head.weight.is_cpu
            and (head.bias is None or head.bias.dtype == torch.float32)):
        logits = _linear_op()(h, head.weight, head.bias)
    else:
        logits = head(h)
    return CausalLMOutputWithPast(loss=None, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                                  attentions=out.attentions)


def _linear_op():
    return kernel.ops().decode_linear.default


class _FastDecodeLMMixin:
    """Causal-LM forward whose one-token, no-grad steps run the float head on the ``decode_linear`` op (see
    :func:`_fast_lm_step`), else the original."""

    def forward(self, *args, **kwargs):
        out = _fast_lm_step(self, args, kwargs)
        if out is not None:
            return out
        return super().forward(*args, **kwargs)


def _ids_from_args(args, kwargs):
    # model(ids, ...): input_ids is the first parameter of the supported stacks' and LMs' forwards
    if not args:
        return kwargs
    if len(args) > 1 or "input_ids" in kwargs:
        return None
    return {**kwargs, "input_ids": args[0]}


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks)


def _capturing() -> bool:
    return _active_collector is not None and bool(_active_collector.get())


class _FastDecodeModelMixin:
    """Decoder-stack forward that runs one decode token through the fused layer steps directly (no mask build when
    none is needed, a cheap rotary, no module call per layer), else the original (see :func:`_fast_model_step`)."""

    def forward(self, *args, **kwargs):
        out = _fast_model_step(self, args, kwargs)
        if out is not None:
            return out
        return super().forward(*args, **kwargs)


_CLASSES: dict = {}


def _fused_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"FastDecode{base.__name__}"
        mixin = (_FastDecodeModelMixin if base.__name__ in SUPPORTED_MODELS
                 else _FastDecodeLMMixin if base.__name__ in SUPPORTED_LMS else _FastDecodeMixin)
        cls = type(name, (mixin, base), {"_hfe_base": base, "__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls  # picklable by name (torch.save of a whole model)
        _CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    # unpickling a whole model (torch.save) in a process that has not switched a layer yet
    base = name.removeprefix("FastDecode")
    if name.startswith("FastDecode") and base in _HOME:
        import importlib

        home = _HOME[base]
        return _fused_class(getattr(importlib.import_module(f"transformers.models.{home}.modeling_{home}"), base))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _why_unsupported(m: nn.Module) -> str | None:
    """None if the layer can be fused, else the reason."""
    a, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    if a is None or mlp is None or any(not hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
            or any(not hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "not a q/k/v/o attention + gate/up/down MLP layer"
    cfg = getattr(a, "config", None)
    if cfg is None or getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not silu"
    for n in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(m, n, None)
        if norm is None or not hasattr(norm, "variance_epsilon") or not type(norm).__name__.endswith("RMSNorm"):
            return f"{n} is not an RMSNorm"
    if getattr(a, "sliding_window", None) is not None or (
            type(m).__name__.startswith("Mistral") and getattr(cfg, "sliding_window", None) is not None):
        return "sliding-window attention"
    return None


def _stack_supported(m: nn.Module) -> bool:
    layers = getattr(m, "layers", None)
    cfg = getattr(m, "config", None)
    return (isinstance(layers, nn.ModuleList) and len(layers) > 0
            and all(isinstance(x, _FastDecodeMixin) for x in layers)
            and all(hasattr(m, n) for n in ("embed_tokens", "rotary_emb", "norm"))
            and not getattr(m, "has_sliding_layers", False)  # Qwen2
            and not (_base_class(m).__name__ == "MistralModel" and getattr(cfg, "sliding_window", None) is not None))


def _base_class(m: nn.Module) -> type:
    return getattr(type(m), "_hfe_base", type(m))


KV_CACHE_CHOICES = ("float32", "float16")


def enable_fast_decode(model: nn.Module, enabled: bool = True, *, kv_cache: str = "float32") -> list[str]:
    """Run one-token decode steps of ``model``'s decoder layers as two fused C++ ops (CPU, no grad, batch 1).

    Supported layers: ``LlamaDecoderLayer``, ``MistralDecoderLayer`` and ``Qwen2DecoderLayer`` with SiLU MLPs and
    full attention. Each is switched in place to a subclass whose forward falls back to the original for any
    other input (see the module docstring), so results elsewhere are unchanged and parameters stay the same objects.
    Returns the names of the switched layers; ``[]`` (and one logged warning) when the model has none.
    What the step streams (float32 projections and head, the LUT streams) is put where it is read fastest
    (:func:`place_streams`: on a page boundary, in 2 MiB pages where Linux allows it; same values, and the same
    Parameter objects).
    ``enabled=False`` switches them back and returns their names.

    ``kv_cache``: what the fused stack's attention reads of a ``DynamicCache``. ``"float16"``: float16 copies of
    the keys and values, kept beside the cache's float32 tensors (which stay as transformers fills them) and
    attended over instead: half the bytes per token, which is what a long generation's attention is bound by,
    for attention outputs within float16 rounding of the float32 ones (llama.cpp's default cache type; opt-in here
    because float16 keys move the scores: docs/lut.md, round 10). ``"float32"`` (default): the cache itself.
    """
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"enable_fast_decode: kv_cache must be one of {KV_CACHE_CHOICES}, got {kv_cache!r}")
    if enabled and not kernel.available():
        raise RuntimeError("enable_fast_decode: the hf_efficient C++ extension is not built")
    names, skipped, stacks, streamed = [], {}, [], []
    for name, m in model.named_modules():
        base = _base_class(m)
        if base.__name__ in SUPPORTED_MODELS or base.__name__ in SUPPORTED_LMS:
            stacks.append(m)
        if base.__name__ not in SUPPORTED:
            continue
        if not enabled:
            if base is not type(m):
                m.__class__ = base
                m.__dict__.pop("_hfe_plan", None)
                names.append(name)
            continue
        why = _why_unsupported(m)
        if why is not None:
            skipped.setdefault(why, name)
            if base is not type(m):  # no longer supported (e.g. a config change): back to the original
                m.__class__ = base
            continue
        m.__class__ = _fused_class(base)
        m.__dict__.pop("_hfe_plan", None)
        names.append(name)
        streamed += [p.weight for p in _modules(m) if type(p) is nn.Linear]
    stacks.sort(key=lambda m: _base_class(m).__name__ in SUPPORTED_LMS)  # an LM after its stack
    for m in stacks:  # the decoder stack's fused step where all its layers run the fused one, then its LM's
        base = _base_class(m)
        if base.__name__ in SUPPORTED_LMS:
            inner = getattr(m, "model", None)
            fused = enabled and isinstance(inner, nn.Module) and isinstance(inner, _FastDecodeModelMixin)
        else:
            fused = enabled and _stack_supported(m)
        m.__class__ = _fused_class(base) if fused else base
        m.__dict__.pop("_hfe_stack", None)
        m.__dict__["_hfe_kv_cache"] = kv_cache
        head = getattr(m, "lm_head", None)
        if fused and type(head) is nn.Linear:
            streamed.append(head.weight)
    if enabled:
        place_streams(model, streamed)
    if enabled and not names:
        arch = type(model).__name__
        if arch not in _WARNED:
            _WARNED.add(arch)
            reason = "; ".join(f"{w} (e.g. {n})" for w, n in skipped.items()) or \
                f"no decoder layer of a supported class ({', '.join(SUPPORTED)})"
            logger.warning("enable_fast_decode: %s has no layer the fused decode step supports: %s", arch, reason)
    return names
