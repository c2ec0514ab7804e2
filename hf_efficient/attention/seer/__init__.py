"""SeerAttention: learned block-sparse attention as ``attn_implementation="seer_attention"``.

Typical use::

    import hf_efficient
    from hf_efficient.attention.seer import load_gates
    model = AutoModelForCausalLM.from_pretrained(base)
    load_gates(model, "gates/", sparsity=0.9)     # switches the model to seer_attention

Gates come from :func:`train_gates` or ``hf-efficient train-gate`` (:mod:`hf_efficient.cli.train_gate`).
"""
from __future__ import annotations

from ... import registry
from . import ops  # noqa: F401  (torch.ops.hf_efficient.seer_*)
from .attention import MissingGateError, attention_modules, seer_attention_forward
from .config import SeerAttentionConfig
from .gate import AttnGate, select_blocks
from .io import attach_gates, configure, gates_of, load_gates, save_gates


def _mask_fn(*args, **kwargs):
    # sdpa's boolean mask (None for a plain causal batch) carries padding to the attention function.
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def train_gates(*args, **kwargs):
    """See :func:`hf_efficient.attention.seer.training.train_gates`."""
    from .training import train_gates as _train

    return _train(*args, **kwargs)


registry.add_attention("seer_attention", seer_attention_forward, _mask_fn)

__all__ = ["AttnGate", "MissingGateError", "SeerAttentionConfig", "attach_gates", "attention_modules", "configure",
           "gates_of", "load_gates", "save_gates", "select_blocks", "seer_attention_forward", "train_gates"]
