"""L0 gates on transformers' ParakeetForCTC (FastConformer encoder), and their physical removal.

Gated structures per encoder block (``L0PruningConfig.structures``):

* ``heads``   one gate per attention head, applied to that head's slice of ``o_proj``'s input;
* ``ffn``     one gate per intermediate neuron of each macaron FFN, applied to ``linear2``'s input;
* ``conv``    one gate per convolution-module channel (after GLU/depthwise/BatchNorm/activation),
              applied to ``pointwise_conv2``'s input;
* ``modules`` one gate per whole attention / convolution / FFN module, applied to its output.

Every gate multiplies the input of a linear map (or the output of a module), so a mask can be folded
into that map's weights and a zero unit removed: :func:`prune_parakeet` builds that smaller dense model,
whose outputs equal the masked model's in eval mode.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .config import L0PruningConfig
from .hard_concrete import HardConcreteGate

MODULE_KINDS = ("ffn1", "attn", "conv", "ffn2")
# Block attribute of each module kind, and of the pre-norm that only feeds it.
_MODULE_ATTR = {"ffn1": "feed_forward1", "attn": "self_attn", "conv": "conv", "ffn2": "feed_forward2"}
_NORM_ATTR = {"ffn1": "norm_feed_forward1", "attn": "norm_self_att", "conv": "norm_conv", "ffn2": "norm_feed_forward2"}
_UNIT_STRUCTURE = {"ffn1": "ffn", "ffn2": "ffn", "attn": "heads", "conv": "conv"}


def _check_model(model) -> Any:
    enc = getattr(model, "encoder", None)
    if enc is None or not hasattr(enc, "layers") or not hasattr(model, "ctc_head"):
        raise ValueError(f"model={type(model).__name__}: expected a ParakeetForCTC (encoder.layers + ctc_head)")
    return enc


def _enc_config(model):
    return model.config.encoder_config


def unit_counts(model) -> list[dict[str, int]]:
    """Per block, the current number of units of each module kind (heads, neurons, channels)."""
    enc = _check_model(model)
    out = []
    for block in enc.layers:
        d = {}
        for kind in MODULE_KINDS:
            mod = getattr(block, _MODULE_ATTR[kind])
            if isinstance(mod, (_Absent, _BiasOnly)):
                d[kind] = 0
            elif kind == "attn":
                d[kind] = mod.o_proj.in_features // mod.head_dim
            elif kind == "conv":
                d[kind] = mod.pointwise_conv2.in_channels
            else:
                d[kind] = mod.linear2.in_features
        out.append(d)
    return out


def unit_params(model) -> dict[str, tuple[int, int]]:
    """Per module kind, ``(params per unit, params of the module independent of its units incl. its norm)``.

    The counts are exact for the unpruned module shapes of transformers' Parakeet blocks; the tests
    check them against ``numel`` of real modules.
    """
    c = _enc_config(model)
    h, ab, cb = c.hidden_size, int(c.attention_bias), int(c.convolution_bias)
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    norm = 2 * h
    return {
        # q, k, v, relative_k rows + o_proj columns, q/k/v biases, bias_u + bias_v
        "attn": (5 * h * d + 3 * d * ab + 2 * d, h * ab + norm),
        # linear1 row (+ bias) and linear2 column
        "ffn1": (2 * h + ab, h * ab + norm),
        "ffn2": (2 * h + ab, h * ab + norm),
        # two pointwise_conv1 rows (GLU halves), depthwise filter, BatchNorm affine, pointwise_conv2 column
        "conv": (2 * h + 2 * cb + c.conv_kernel_size + cb + 2 + h, h * cb + norm),
    }


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class ParakeetL0Pruner(nn.Module):
    """Hard-concrete gates attached to a ParakeetForCTC through forward hooks (the model class is untouched).

    One set of masks is drawn per model forward: sampled when ``model.training``, the deterministic
    evaluation mask otherwise. ``remove()`` detaches the hooks. The gates are this module's parameters,
    kept apart from the model's so that ``save_pretrained`` never sees them.
    """

    def __init__(self, model, config: L0PruningConfig | None = None):
        super().__init__()
        self.config = config or L0PruningConfig()
        enc = _check_model(model)
        self.num_layers = len(enc.layers)
        self.total_params = count_params(model)
        self._unit_params = unit_params(model)
        self._full_units = unit_counts(model)
        prunable = sum(self._module_full_params(i, k) for i in range(self.num_layers) for k in MODULE_KINDS)
        self.fixed_params = self.total_params - prunable
        s, cfg = self.config.structures, self.config
        kw = dict(init_keep_prob=cfg.init_keep_prob, beta=cfg.beta, stretch=cfg.stretch)
        self.gates = nn.ModuleDict()
        for i in range(self.num_layers):
            for kind in MODULE_KINDS:
                n = self._full_units[i][kind]
                if _UNIT_STRUCTURE[kind] in s and n > 0:
                    self.gates[f"{i}_{kind}_units"] = HardConcreteGate(n, **kw)
                if "modules" in s and n > 0:
                    self.gates[f"{i}_{kind}_module"] = HardConcreteGate(1, **kw)
        self._masks: dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._draw_masks)]
        for i, block in enumerate(enc.layers):
            self._hook_block(i, block)

    def _module_full_params(self, i: int, kind: str) -> int:
        per, fixed = self._unit_params[kind]
        return per * self._full_units[i][kind] + fixed

    # --- masks -------------------------------------------------------------------------------
    def _draw_masks(self, model, args):
        sample = model.training
        self._masks = {k: (g.sample() if sample else g.deterministic()) for k, g in self.gates.items()}

    def masks(self) -> dict[str, torch.Tensor]:
        """Deterministic evaluation masks, ``{"<layer>_<kind>_units"|"<layer>_<kind>_module": tensor}``."""
        return {k: g.deterministic() for k, g in self.gates.items()}

    def _mask(self, key):
        return self._masks.get(key)

    def _hook_block(self, i: int, block) -> None:
        def pre_scale(key, reshape=None):
            def hook(mod, args):
                m = self._mask(key)
                if m is None:
                    return None
                x = args[0]
                if reshape == "heads":
                    shp = x.shape
                    x = (x.view(*shp[:-1], m.numel(), -1) * m[:, None].to(x.dtype)).view(shp)
                elif reshape == "channels":
                    x = x * m[None, :, None].to(x.dtype)
                else:
                    x = x * m.to(x.dtype)
                return (x, *args[1:])
            return hook

        def post_scale(key):
            def hook(mod, args, out):
                m = self._mask(key)
                if m is None:
                    return None
                if isinstance(out, tuple):
                    return (out[0] * m.to(out[0].dtype), *out[1:])
                return out * m.to(out.dtype)
            return hook

        h = self._handles
        h.append(block.feed_forward1.linear2.register_forward_pre_hook(pre_scale(f"{i}_ffn1_units")))
        h.append(block.feed_forward2.linear2.register_forward_pre_hook(pre_scale(f"{i}_ffn2_units")))
        h.append(block.self_attn.o_proj.register_forward_pre_hook(pre_scale(f"{i}_attn_units", "heads")))
        h.append(block.conv.pointwise_conv2.register_forward_pre_hook(pre_scale(f"{i}_conv_units", "channels")))
        for kind in MODULE_KINDS:
            h.append(getattr(block, _MODULE_ATTR[kind]).register_forward_hook(post_scale(f"{i}_{kind}_module")))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- expected size -----------------------------------------------------------------------
    def expected_params(self) -> torch.Tensor:
        """Differentiable E[#parameters] of the model under the gates (a scalar tensor)."""
        total = torch.tensor(float(self.fixed_params), device=self._device())
        for i in range(self.num_layers):
            for kind in MODULE_KINDS:
                per, fixed = self._unit_params[kind]
                ug = self.gates[f"{i}_{kind}_units"] if f"{i}_{kind}_units" in self.gates else None
                units = ug.expected_l0() if ug is not None else self._full_units[i][kind]
                mg = self.gates[f"{i}_{kind}_module"] if f"{i}_{kind}_module" in self.gates else None
                p_mod = mg.expected_l0() if mg is not None else 1.0
                total = total + p_mod * (per * units + fixed)
        return total

    def expected_sparsity(self) -> torch.Tensor:
        return 1.0 - self.expected_params() / self.total_params

    def _device(self):
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


# --- physical pruning ------------------------------------------------------------------------
class _Absent(nn.Module):
    """A removed module: contributes exactly zero to its residual branch."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.returns_tuple else out


class _BiasOnly(nn.Module):
    """A module whose units were all removed but whose output bias survives: a constant output."""

    def __init__(self, hidden_size: int, returns_tuple: bool):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = self.bias.to(hidden_states.dtype).expand_as(hidden_states)
        return (out, None) if self.returns_tuple else out


def _select_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data if rows is None else lin.bias.data[rows])
    return new


def _select_conv(conv: nn.Conv1d, out_idx=None, in_idx=None, depthwise=False) -> nn.Conv1d:
    w = conv.weight.data
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None and not depthwise:
        w = w[:, in_idx]
    out_ch = w.shape[0]
    in_ch = out_ch if depthwise else w.shape[1]
    new = nn.Conv1d(in_ch, out_ch, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    groups=out_ch if depthwise else 1, bias=conv.bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data if out_idx is None else conv.bias.data[out_idx])
    return new


def _layer_masks(masks: dict[str, torch.Tensor], i: int, kind: str, n: int):
    units = masks.get(f"{i}_{kind}_units")
    units = torch.ones(n, device="cpu", dtype=torch.float64) if units is None else units.detach().double().cpu()
    mod = masks.get(f"{i}_{kind}_module")
    mod = 1.0 if mod is None else float(mod.detach().reshape(-1)[0])
    return units, mod


def layout_from_model(model) -> list[dict[str, int]]:
    """Per block ``{kind: units}``, with -1 for a removed module (0 means: only its output bias remains)."""
    enc = _check_model(model)
    out = []
    for block, counts in zip(enc.layers, unit_counts(model)):
        out.append({k: (-1 if isinstance(getattr(block, _MODULE_ATTR[k]), _Absent) else counts[k])
                    for k in MODULE_KINDS})
    return out


@torch.no_grad()
def prune_parakeet(model, masks: dict[str, torch.Tensor]):
    """A smaller dense copy of ``model`` with every zero unit/module removed and the mask values folded in.

    Args:
        model: a ParakeetForCTC (left unchanged; hooks of a pruner on it are not copied).
        masks: ``ParakeetL0Pruner.masks()`` or the same keys from elsewhere (e.g. magnitude pruning);
            a missing key means "keep everything at scale 1".
    Returns:
        a :class:`PrunedParakeetForCTC` whose eval-mode outputs equal the masked model's.
    """
    enc = _check_model(model)
    new = PrunedParakeetForCTC(copy.deepcopy(model.config), _skip_layout=True)
    ref = next(model.parameters())
    new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(model.state_dict())
    new.train(model.training)
    counts = unit_counts(model)
    for i, block in enumerate(new.encoder.layers):
        for kind in MODULE_KINDS:
            units, mod_scale = _layer_masks(masks, i, kind, counts[i][kind])
            _prune_module(new, block, kind, units, mod_scale)
    new.config.pruning_layout = layout_from_model(new)
    return new


def _prune_module(model, block, kind: str, units: torch.Tensor, mod_scale: float) -> None:
    attr, mod = _MODULE_ATTR[kind], getattr(block, _MODULE_ATTR[kind])
    tup = kind == "attn"
    if isinstance(mod, (_Absent, _BiasOnly)):
        return
    keep = torch.nonzero(units * mod_scale != 0).flatten()
    if mod_scale == 0.0:
        setattr(block, attr, _Absent(tup))
        setattr(block, _NORM_ATTR[kind], nn.Identity())
        return
    scale = (units[keep] * mod_scale)
    if kind == "attn":
        out_lin = mod.o_proj
    elif kind == "conv":
        out_lin = mod.pointwise_conv2
    else:
        out_lin = mod.linear2
    if keep.numel() == 0:
        const = _BiasOnly(_enc_config(model).hidden_size, tup).to(out_lin.weight.device, out_lin.weight.dtype)
        if out_lin.bias is not None:
            const.bias.data.copy_(out_lin.bias.data * mod_scale)
        setattr(block, attr, const)
        setattr(block, _NORM_ATTR[kind], nn.Identity())
        return
    dev = out_lin.weight.device
    keep, scale = keep.to(dev), scale.to(dev, out_lin.weight.dtype)
    if kind in ("ffn1", "ffn2"):
        mod.linear1 = _select_linear(mod.linear1, rows=keep)
        mod.linear2 = _select_linear(mod.linear2, cols=keep)
        mod.linear2.weight.data *= scale[None, :]
        if mod.linear2.bias is not None:
            mod.linear2.bias.data *= mod_scale
    elif kind == "conv":
        c = mod.depthwise_conv.out_channels
        mod.pointwise_conv1 = _select_conv(mod.pointwise_conv1, out_idx=torch.cat([keep, keep + c]))
        mod.depthwise_conv = _select_conv(mod.depthwise_conv, out_idx=keep, depthwise=True)
        bn = nn.BatchNorm1d(keep.numel(), eps=mod.norm.eps, momentum=mod.norm.momentum,
                            affine=mod.norm.affine, track_running_stats=mod.norm.track_running_stats).to(dev, mod.norm.running_mean.dtype)
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(mod.norm, name)
            if src is not None:
                getattr(bn, name).data.copy_(src.data[keep])
        if mod.norm.num_batches_tracked is not None:
            bn.num_batches_tracked.copy_(mod.norm.num_batches_tracked)
        bn.train(mod.norm.training)
        mod.norm = bn
        mod.pointwise_conv2 = _select_conv(mod.pointwise_conv2, in_idx=keep)
        mod.pointwise_conv2.weight.data *= scale[None, :, None]
        if mod.pointwise_conv2.bias is not None:
            mod.pointwise_conv2.bias.data *= mod_scale
    else:
        d = mod.head_dim
        cols = (keep[:, None] * d + torch.arange(d, device=dev)[None, :]).flatten()
        for name in ("q_proj", "k_proj", "v_proj", "relative_k_proj"):
            setattr(mod, name, _select_linear(getattr(mod, name), rows=cols))
        mod.o_proj = _select_linear(mod.o_proj, cols=cols)
        mod.o_proj.weight.data *= scale.repeat_interleave(d)[None, :]
        if mod.o_proj.bias is not None:
            mod.o_proj.bias.data *= mod_scale
        mod.bias_u = nn.Parameter(mod.bias_u.data[keep].clone())
        mod.bias_v = nn.Parameter(mod.bias_v.data[keep].clone())
        # The attention reads its head count from its config: give it a private copy.
        mod.config = copy.copy(mod.config)
        mod.config.num_attention_heads = keep.numel()
        mod.config.num_key_value_heads = keep.numel()


def _resize_to_layout(model, layout: list[dict[str, int]]) -> None:
    """Shape a freshly built model like a pruned one (weights are loaded afterwards)."""
    enc = _check_model(model)
    if len(layout) != len(enc.layers):
        raise ValueError(f"pruning_layout has {len(layout)} blocks, the encoder {len(enc.layers)}")
    for i, (block, entry) in enumerate(zip(enc.layers, layout)):
        full = unit_counts(model)[i]
        for kind in MODULE_KINDS:
            n = int(entry[kind])
            if n > full[kind]:
                raise ValueError(f"pruning_layout[{i}][{kind!r}]={n}: more than the {full[kind]} units of the config")
            if n < 0:
                units, scale = torch.zeros(full[kind], device="cpu"), 0.0
            else:
                units, scale = torch.zeros(full[kind], device="cpu"), 1.0
                units[:n] = 1.0
            _prune_module(model, block, kind, units, scale)


def _parakeet_ctc_cls():
    from transformers import ParakeetForCTC
    return ParakeetForCTC


class PrunedParakeetForCTC(_parakeet_ctc_cls()):
    """ParakeetForCTC with per-block sizes from ``config.pruning_layout`` (a list of ``{kind: units}``).

    ``PrunedParakeetForCTC.from_pretrained(path)`` reloads a pruned checkpoint; plain ``ParakeetForCTC``
    refuses it with shape mismatches, so a load without this class fails loudly.
    """

    def __init__(self, config, _skip_layout: bool = False):
        super().__init__(config)
        layout = getattr(config, "pruning_layout", None)
        if layout is not None and not _skip_layout:
            _resize_to_layout(self, layout)


@torch.no_grad()
def magnitude_masks(model, keep_fraction: float) -> dict[str, torch.Tensor]:
    """Baseline masks: in every unit group keep the ``ceil(keep_fraction * n)`` units of largest weight norm.

    A unit's score is ``||input weights|| * ||output weights||`` (heads: q/k/v/relative-k rows and o_proj
    columns of the head; FFN neurons: linear1 row, linear2 column; conv channels: the two GLU rows of
    pointwise_conv1 and the pointwise_conv2 column). Whole modules are kept. Keys as in
    :meth:`ParakeetL0Pruner.masks`, values 0/1.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction!r}: must be in (0, 1]")
    enc = _check_model(model)
    masks = {}
    for i, block in enumerate(enc.layers):
        for kind in MODULE_KINDS:
            mod = getattr(block, _MODULE_ATTR[kind])
            if isinstance(mod, (_Absent, _BiasOnly)):
                continue
            if kind == "attn":
                h, d = mod.o_proj.in_features // mod.head_dim, mod.head_dim
                rows = sum(getattr(mod, n).weight.view(h, d, -1).pow(2).sum((1, 2))
                           for n in ("q_proj", "k_proj", "v_proj", "relative_k_proj"))
                score = rows.sqrt() * mod.o_proj.weight.view(-1, h, d).pow(2).sum((0, 2)).sqrt()
            elif kind == "conv":
                c = mod.depthwise_conv.out_channels
                w1 = mod.pointwise_conv1.weight.squeeze(-1)
                score = (w1[:c].norm(dim=1) * w1[c:].norm(dim=1)) * mod.pointwise_conv2.weight.squeeze(-1).norm(dim=0)
            else:
                score = mod.linear1.weight.norm(dim=1) * mod.linear2.weight.norm(dim=0)
            n = score.numel()
            keep = max(1, math.ceil(keep_fraction * n - 1e-9))
            m = torch.zeros(n, device="cpu", dtype=torch.float64)
            m[torch.argsort(score.float().cpu(), descending=True)[:keep]] = 1.0
            masks[f"{i}_{kind}_units"] = m
    return masks
