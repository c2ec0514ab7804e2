"""Calibrated quantization of a whole model (``quantize``) and the ``hf-efficient quantize`` command.

Quantize-on-load sees one tensor at a time; GPTQ and MoFQ's output-error selection need the layer inputs,
so this runs as its own step and writes a pre-quantized checkpoint that ``from_pretrained`` reloads:

1. calibration windows come from the corpus's training plays (``hf_efficient.data``, via ``datasets``);
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


def calibration_windows(tokenizer, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(n, seqlen)`` token windows sampled from the training (calibration) plays."""
    from ..data import sample_windows, token_ids

    pool = token_ids(tokenizer, "train", max(4 * n * seqlen, 50_000))
    return sample_windows(pool, n, seqlen, seed)


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


def _make_quant_linear(lin: nn.Linear, name: str, config: QuantConfigBase, H, inputs):
    """QuantLinear for ``lin``: GPTQ when a Hessian ``H`` is given, else round-to-nearest."""
    from .gptq import gptq_quantize
    from .linear import QuantLinear, rtn_quantize

    fmt = config.choose_format(name, lin.weight, inputs)
    config.record_choice(name, fmt)
    spec = config.layer_spec(name)
    q = QuantLinear(lin.in_features, lin.out_features, fmt, spec.group_size, lin.bias is not None,
                    config.scale_torch_dtype, spec.act_fmt, device=lin.weight.device, dtype=lin.weight.dtype)
    if H is not None:
        codes, params = gptq_quantize(lin.weight, H, q.fmt, q.group_size, q.scale_dtype, config.act_order,
                                      config.damp, name=name)
    else:
        codes, params = rtn_quantize(lin.weight, q.fmt, q.group_size, q.scale_dtype, name)
    q.load_quantized(codes, params)
    if lin.bias is not None:
        q.bias.data.copy_(lin.bias.detach())
    return q


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfigBase, windows: torch.Tensor | None = None,
                   progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with ``config`` (GPTQ or RTN; MoFQ choices recorded in ``config``).

    ``windows`` (n, seqlen) calibration tokens are needed when ``config.needs_calibration()`` says so.
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
        layers = decoder_layers(model)
        prefix = next(n for n, m in model.named_modules() if m is layers)
        hidden, kwargs = _capture_first_layer_inputs(model, layers, windows, device)
        for i, layer in enumerate(tqdm(layers, desc=f"{config.quant_method} {config.algorithm}", disable=not progress)):
            names = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules() if f"{prefix}.{i}.{n}" in linears}
            stats = {n: {"H": None, "x": []} for n in names}
            hooks = []
            for n, m in names.items():
                def hook(mod, args, _n=n):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    st = stats[_n]
                    if config.algorithm == "gptq":
                        if st["H"] is None:
                            from .gptq import HessianAccumulator
                            st["H"] = HessianAccumulator(x.shape[-1], x.device)
                        st["H"].add(x)
                    if sum(len(t) for t in st["x"]) < MAX_SELECTION_TOKENS:
                        st["x"].append(x[:: max(1, x.shape[0] // 512)].float())
                hooks.append(m.register_forward_pre_hook(hook))
            try:
                for h, kw in zip(hidden, kwargs):
                    layer(h, **kw)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in names.items():
                st = stats[n]
                H = st["H"].H if st["H"] is not None else None
                model.set_submodule(n, _make_quant_linear(m, n, config, H, torch.cat(st["x"])))
                done.add(n)
            hidden = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    for n, m in linears.items():
        if n not in done:
            # Linears outside the decoder stack (no Hessian collected) get round-to-nearest.
            model.set_submodule(n, _make_quant_linear(m, n, config, None, None))
    model.config.quantization_config = config
    # The registry pairs the config with its quantizer (capabilities never import the integrations layer).
    quantizer_cls = registry.register_all().quantization[config.quant_method].quantizer()
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    summary = config.summary()
    if summary:
        logger.info(summary)
    return model


def quantize(model_path: str | os.PathLike | None, config: QuantConfigBase, out_dir: str | os.PathLike | None = None,
             *, device: str = "cpu", seed: int = 0, progress: bool = True):
    """Load a float model (None = the embedded model), quantize it with ``config``, optionally save it.

    Calibration uses ``config.calib_samples`` windows of ``config.calib_seqlen`` tokens from the training
    plays. Returns ``(model, tokenizer)``; with ``out_dir`` the pre-quantized checkpoint (packed safetensors,
    config with ``quantization_config``) and the tokenizer are written there, reloadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import hf_efficient``.
    """
    from ..models import load_model

    model, tok = load_model(model_path, dtype=torch.float32, device=device)
    windows = calibration_windows(tok, config.calib_samples, config.calib_seqlen, seed) \
        if config.needs_calibration() else None
    quantize_model(model, config, windows, progress=progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return model, tok


HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"


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
