"""Attach, configure, save and load SeerAttention gates (safetensors + a small JSON config)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .attention import GATE_ATTR, NAME, attention_modules
from .config import FORMAT_VERSION, SeerAttentionConfig
from .gate import AttnGate

WEIGHTS_NAME = "seer_gates.safetensors"
CONFIG_NAME = "seer_config.json"


def _shape(model, mod) -> tuple[int, int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    return heads, heads // mod.num_key_value_groups, mod.head_dim


def attach_gates(model, config: SeerAttentionConfig | None = None, *, seed: int = 0,
                 set_implementation: bool = True) -> list[AttnGate]:
    """Give every attention layer a fresh (untrained) AttnGate on the layer's device; returns the gates."""
    config = config or SeerAttentionConfig()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    gates = []
    try:
        for mod in attention_modules(model):
            h, hkv, d = _shape(model, mod)
            dev = next(mod.parameters()).device
            gate = AttnGate(h, hkv, d, config).to(dev)
            setattr(mod, GATE_ATTR, gate)
            gates.append(gate)
    finally:
        torch.random.set_rng_state(gen_state)
    if set_implementation:
        model.set_attn_implementation(NAME)
    return gates


def gates_of(model) -> list[AttnGate]:
    """The model's gates in layer order (raises if any layer lacks one)."""
    mods = attention_modules(model)
    missing = [m.layer_idx for m in mods if getattr(m, GATE_ATTR, None) is None]
    if missing:
        raise ValueError(f"layers {missing} have no SeerAttention gate; attach_gates/load_gates first")
    return [getattr(m, GATE_ATTR) for m in mods]


def configure(model, **selection) -> SeerAttentionConfig:
    """Change block selection on every gate (``mode``, ``threshold``, ``top_k``, ``sparsity``, ``decode``)."""
    gates = gates_of(model)
    new = gates[0].config.with_selection(**selection)
    for g in gates:
        g.config = new
    return new


def save_gates(model, path: str | os.PathLike) -> Path:
    """Write ``path/seer_gates.safetensors`` and ``path/seer_config.json`` (the gates only, not the base model)."""
    from safetensors.torch import save_file

    gates = gates_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, g in enumerate(gates):
        tensors[f"layers.{i}.q_weight"] = g.q_weight.detach().float().cpu().contiguous()
        tensors[f"layers.{i}.k_weight"] = g.k_weight.detach().float().cpu().contiguous()
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    meta = {"format_version": FORMAT_VERSION, "seer_attention": gates[0].config.to_dict(),
            "num_layers": len(gates), "num_heads": gates[0].num_heads, "num_kv_heads": gates[0].num_kv_heads,
            "head_dim": gates[0].head_dim, "base_model": getattr(model.config, "name_or_path", None)}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    cfg_file = p / CONFIG_NAME if p.is_dir() else p
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no SeerAttention gate config at {cfg_file} (expected a folder written by "
                                f"save_gates / `hf-efficient train-gate`)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: gate format_version {meta.get('format_version')!r} is not supported "
                         f"(this hf-efficient reads {FORMAT_VERSION})")
    return meta


def load_gates(model, path: str | os.PathLike, **selection) -> SeerAttentionConfig:
    """Load trained gates from ``path`` onto ``model`` and switch it to ``attn_implementation='seer_attention'``.

    ``selection`` overrides block selection (e.g. ``sparsity=0.9``). Raises ValueError when the gates do
    not fit the model (layer count, head counts, head_dim) or tensors are missing.
    """
    from safetensors.torch import load_file

    meta = read_config(path)
    config = SeerAttentionConfig.from_dict(meta["seer_attention"])
    if selection:
        config = config.with_selection(**selection)
    mods = attention_modules(model)
    if meta["num_layers"] != len(mods):
        raise ValueError(f"gates at {path} are for {meta['num_layers']} layers, the model has {len(mods)}")
    tensors = load_file(Path(path) / WEIGHTS_NAME)
    for i, mod in enumerate(mods):
        h, hkv, d = _shape(model, mod)
        if (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) != (h, hkv, d):
            raise ValueError(f"gates at {path} are for {meta['num_heads']} heads / {meta['num_kv_heads']} kv heads / "
                             f"head_dim {meta['head_dim']}; layer {i} has {h} / {hkv} / {d}")
        names = (f"layers.{i}.q_weight", f"layers.{i}.k_weight")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{Path(path) / WEIGHTS_NAME} lacks {missing} (gates for layer {i} missing)")
        dev = next(mod.parameters()).device
        gate = AttnGate(h, hkv, d, config)
        try:
            gate.load_state_dict({"q_weight": tensors[names[0]], "k_weight": tensors[names[1]]})
        except RuntimeError as e:
            raise ValueError(f"gates at {path}, layer {i}: tensor shapes do not match the model: {e}") from e
        setattr(mod, GATE_ATTR, gate.to(dev))
    model.set_attn_implementation(NAME)
    return config
