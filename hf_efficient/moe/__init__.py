"""Pre-gated MoE: expert offloading with next-layer expert prediction and prefetch, and trained pre-gates.

>>> from hf_efficient.moe import enable_pregated_offload
>>> off = enable_pregated_offload(model, gpu_budget_gb=2, mode="speculative")   # after from_pretrained(...).cuda()
"""
from .config import MODES, OffloadConfig, PregateConfig
from .layers import MoELayer, find_moe_layers
from .offload import OffloadStats, PregatedOffload, enable_pregated_offload
from .pregate import add_pregates, distill_pregates, load_pregates, pregate_recall, save_pregates, train_pregates
from .routing import RouterHooks, enable_pregated_routing

__all__ = ["MODES", "OffloadConfig", "PregateConfig", "MoELayer", "find_moe_layers", "OffloadStats",
           "PregatedOffload", "enable_pregated_offload", "add_pregates", "distill_pregates", "load_pregates",
           "pregate_recall", "save_pregates", "train_pregates", "RouterHooks", "enable_pregated_routing"]
