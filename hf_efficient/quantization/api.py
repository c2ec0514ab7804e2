"""Calibrated quantization of a whole model (``quantize``) and the ``hf-efficient quantize`` command.

Quantize-on-load sees one tensor at a time; GPTQ and MoFQ's output-error selection need the layer inputs,
so this runs as its own step and writes a pre-quantized checkpoint that ``from_pretrained`` reloads:

1. calibration windows come from ``config.calib_source`` (``hf_efficient.data``): by default half training
   plays, half text the model writes itself from short prompts; or the user's files / ``datasets`` dataset;
2. the inputs of the first decoder layer are captured, then each decoder layer in turn: hooks collect
   its linears' inputs (Hessians; a token subsample for MoFQ), each linear is quantized (GPTQ or RTN, in the
   format the config gives or chooses) and replaced by a QuantLinear, and the layer is re-run to produce
   the (quantized) inputs of the next layer;
3. linears outside the decoder layers that are not skipped get RTN.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import registry
from .card import install_card_writer
from .config import QuantConfigBase, matches_module

logger = logging.getLogger(__name__)
MAX_SELECTION_TOKENS = 4096


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList holding the most parameters."""
    best, size = None, 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = m, n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers to calibrate layer by layer")
    return best


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0, source: str = "plays", model=None,
                        progress: bool = True) -> torch.Tensor:
    """``(n, seqlen)`` calibration token windows from ``source`` (see :func:`hf_efficient.data.calibration_windows`;
    "generated" and "mixed" need the float ``model``, which writes that text)."""
    from ..data import calibration_windows as windows

    return windows(tokenizer, n, seqlen, seed, source, model, progress)


@torch.no_grad()
def _capture_first_layer_inputs(model, layers, windows, device):
    inputs, kwargs = [], []

    def hook(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(w[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return inputs, kwargs


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _new_quant_linear(lin: nn.Linear, name: str, config: QuantConfigBase, fmt: str):
    from .linear import QuantLinear

    spec = config.layer_spec(name)
    q = QuantLinear(lin.in_features, lin.out_features, fmt, spec.group_size, lin.bias is not None,
                    config.scale_torch_dtype, spec.act_fmt, device=lin.weight.device, dtype=lin.weight.dtype)
    if lin.bias is not None:
        q.bias.data.copy_(lin.bias.detach())
    return q


def _make_quant_linear(lin: nn.Linear, name: str, config: QuantConfigBase, H, inputs):
    """QuantLinear for ``lin``: GPTQ when a Hessian ``H`` is given, else round-to-nearest."""
    return _quantize_linears({name: lin}, config, H, inputs)[name]


def _quantize_linears(linears: dict, config: QuantConfigBase, H, inputs) -> dict:
    """QuantLinears for linears that read the same input (Hessian ``H``, calibration sample ``inputs``).

    Each layer's format is chosen (and recorded) first; layers that end up with the same format and group
    size are then quantized as one row-stacked matrix: GPTQ treats rows independently given H, so this
    equals quantizing them one by one, with one pass over the columns instead of several.
    """
    from .gptq import gptq_quantize
    from .linear import rtn_quantize

    out, by_format = {}, {}
    for name, lin in linears.items():
        fmt = config.choose_format(name, lin.weight, inputs)
        config.record_choice(name, fmt)
        q = _new_quant_linear(lin, name, config, fmt)
        out[name] = q
        by_format.setdefault((q.fmt.name, q.group_size), []).append(name)
    for names in by_format.values():
        q0 = out[names[0]]
        label = "+".join(names)
        if H is not None:
            W = torch.cat([linears[n].weight for n in names])
            codes, params = gptq_quantize(W, H, q0.fmt, q0.group_size, q0.scale_dtype, config.act_order,
                                          config.damp, name=label)
        else:
            W = torch.cat([linears[n].weight for n in names])
            codes, params = rtn_quantize(W, q0.fmt, q0.group_size, q0.scale_dtype, label)
        row = 0
        for n in names:
            rows = slice(row, row + out[n].out_features)
            out[n].load_quantized(codes[rows], {p: t[rows] for p, t in params.items()})
            row = rows.stop
    return out


def _collect_layer_inputs(layer, names: dict, hidden, kwargs, want_hessian: bool, sample_tokens: int):
    """Run ``layer`` over the calibration hidden states and gather what its linears see.

    Linears fed the very same tensor (q/k/v from one norm, gate/up) form one input group, with one Hessian
    and one token sample. Returns ``[(names, HessianAccumulator | None, sample (tokens, in))]``. The layer's
    forward stops as soon as every linear has seen its input: its output is not needed here (the re-run
    with the quantized weights makes the next layer's inputs), which spares the last linear's matmul.
    """
    from .gptq import HessianAccumulator

    seen: dict = {}

    def record(name, x):
        seen.setdefault(name, x)
        if len(seen) == len(names):
            raise _Stop

    hooks = [m.register_forward_pre_hook(lambda mod, args, _n=n: record(_n, args[0])) for n, m in names.items()]
    groups: dict[tuple, list] = {}
    try:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            try:
                layer(h, **kw)
            except _Stop:
                pass
            by_tensor: dict[tuple, list] = {}
            for n, x in seen.items():
                by_tensor.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(n)
            for key, ns in by_tensor.items():
                x = seen[ns[0]].reshape(-1, seen[ns[0]].shape[-1]).float()
                g = groups.setdefault(tuple(ns), [HessianAccumulator(x.shape[-1], x.device) if want_hessian
                                                  else None, [], 0])
                if want_hessian:
                    g[0].add(x)
                # An evenly spread sample across windows for the format choice (MoFQ).
                per_window = max(1, sample_tokens // max(1, len(hidden)))
                if g[2] < sample_tokens:
                    g[1].append(x[:: max(1, x.shape[0] // per_window)][:per_window])
                    g[2] += len(g[1][-1])
    finally:
        for hk in hooks:
            hk.remove()
    return [(list(ns), acc, torch.cat(xs)) for ns, (acc, xs, _) in groups.items()]


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfigBase, windows: torch.Tensor | None = None,
                   progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (GPTQ or RTN; MoFQ choices recorded in ``config``).

    ``windows`` (n, seqlen) calibration tokens are needed when ``config.needs_calibration()`` says so.
    Without GPTQ only a token sample is needed (for MoFQ's output-error choice: ``config.selection_tokens``),
    so only as many windows as hold twice that many tokens are run.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    skip = list(config.modules_to_not_convert)
    if getattr(model.config, "tie_word_embeddings", False):
        skip.append("lm_head")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not matches_module(n, skip)}
    calibrated = config.needs_calibration() is not None
    if calibrated and windows is None:
        raise ValueError(f"{type(config).__name__}: {config.needs_calibration()}; pass calibration windows")
    done = set()
    if calibrated:
        gptq = config.algorithm == "gptq"
        sample_tokens = getattr(config, "selection_tokens", MAX_SELECTION_TOKENS)
        if not gptq:  # spread over the set: a "mixed" set holds the plays first, then the generated text
            keep = min(len(windows), max(1, -(-2 * sample_tokens // windows.shape[1])))
            windows = windows[torch.linspace(0, len(windows) - 1, keep).round().long()]
        layers = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        hidden, kwargs = _capture_first_layer_inputs(model, layers, windows, device)
        for i, layer in enumerate(tqdm(layers, desc=f"{config.quant_method} {config.algorithm}", disable=not progress)):
            names = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules() if f"{prefix}.{i}.{n}" in linears}
            made_all = {}
            for group, acc, sample in _collect_layer_inputs(layer, names, hidden, kwargs, gptq, sample_tokens):
                made = _quantize_linears({n: names[n] for n in group}, config, acc.H if acc is not None else None,
                                         sample)
                for n, q in made.items():
                    # The next layer's inputs come from this layer with its quantized weights. Weight-only: the
                    # float linear holding them dequantized runs that in one matmul (QuantLinear's reference
                    # path dequantizes on every call, a CPU fast path may round activations); it is swapped
                    # for the QuantLinear after the re-run.
                    if q.act_fmt is None:
                        names[n].weight.copy_(q.dequantize(names[n].weight.dtype))
                    else:
                        model.set_submodule(n, q)
                    made_all[n] = q
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
            for n, q in made_all.items():
                model.set_submodule(n, q)
                done.add(n)
    for n, m in linears.items():
        if n not in done:
            # Linears outside the decoder stack (no Hessian collected) get round-to-nearest.
            model.set_submodule(n, _make_quant_linear(m, n, config, None, None))
    model.config.quantization_config = config
    # The registry pairs the config with its quantizer (capabilities never import the integrations layer).
    quantizer_cls = registry.register_all().quantization[config.quant_method].quantizer()
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
    install_card_writer(model)  # save_pretrained also writes README.md (what this is, how to load it)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    summary = config.summary()
    if summary:
        logger.info(summary)
    return model


def quantize(model_path: str | os.PathLike | None, config: QuantConfigBase, out_dir: str | os.PathLike | None = None,
             *, device: str = "cpu", seed: int = 0, progress: bool = True):
    """Load a float model (None = the embedded model), quantize it with ``config``, optionally save it.

    Calibration uses ``config.calib_samples`` windows of ``config.calib_seqlen`` tokens from
    ``config.calib_source`` (default: training plays mixed with text the model generates itself).
    Returns ``(model, tokenizer)``; with ``out_dir`` the pre-quantized checkpoint (packed safetensors,
    config with ``quantization_config``) and the tokenizer are written there, reloadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import hf_efficient``.
    """
    from ..models import load_model

    model, tok = load_model(model_path, dtype=torch.float32, device=device)
    windows = calibration_windows(tok, config.calib_samples, config.calib_seqlen, seed, config.calib_source, model,
                                  progress) if config.needs_calibration() else None
    quantize_model(model, config, windows, progress=progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


def hub_configs_dir() -> Path:
    """The recipes folder: package data ``hf_efficient/hub_configs`` in an installed wheel, the repository's
    top-level ``hub_configs/`` in a source checkout (editable install)."""
    installed = Path(__file__).resolve().parents[1] / "hub_configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "hub_configs"


HUB_CONFIGS = hub_configs_dir()


def load_config_file(path: str | os.PathLike) -> QuantConfigBase:
    """A config from a JSON file, or a recipe name of ``hub_configs/`` (``"afpq-fp4-g128"``, ``"mofq-w8a8"``, ...).

    The file's ``quant_method`` picks the class (AFPQConfig / MoFQConfig).
    """
    import json

    p = Path(path)
    if not p.is_file() and (HUB_CONFIGS / f"{path}.json").is_file():
        p = HUB_CONFIGS / f"{path}.json"
    if not p.is_file():
        known = sorted(f.stem for f in HUB_CONFIGS.glob("*.json")) if HUB_CONFIGS.is_dir() else []
        raise ValueError(f"quantization config {str(path)!r} is neither a file nor a recipe in hub_configs/ {known}")
    d = json.loads(p.read_text())
    method = d.get("quant_method")
    methods = registry.register_all().quantization
    if method not in methods:
        raise ValueError(f"{path}: quant_method {method!r} is not one of ours ({sorted(methods)})")
    return methods[method].config_cls.from_dict(d)
