"""Layerwise distillation: L1 distance minus cosine similarity, through a learned linear map per layer."""
from __future__ import annotations

import torch
from torch import nn


class LayerwiseDistiller(nn.Module):
    """Maps student hidden states onto the teacher's at chosen layers and scores the gap.

    Args:
        hidden_size: width of both models' hidden states (structured pruning keeps it).
        layers: indices into the ``hidden_states`` tuples (0 is the encoder's input to block 0,
            ``i + 1`` the output of block ``i``).
    The maps start as the identity, so an unpruned student starts with zero L1 and cosine 1.
    """

    def __init__(self, hidden_size: int, layers: tuple[int, ...]):
        super().__init__()
        if not layers:
            raise ValueError("layers=(): distillation needs at least one layer")
        self.layers = tuple(int(i) for i in layers)
        self.maps = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in self.layers)
        for m in self.maps:
            nn.init.eye_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over layers of ``L1(map(s), t) - cos(map(s), t)``, averaged over valid frames.

        Args:
            student, teacher: hidden-state tuples, each tensor (batch, frames, hidden).
            frame_mask: (batch, frames) bool/int, 1 on real frames; None means all frames count.
        """
        total = 0.0
        for idx, m in zip(self.layers, self.maps):
            if idx >= len(student) or idx >= len(teacher):
                raise ValueError(f"distill layer {idx}: the models return {len(student)} hidden states")
            s, t = m(student[idx]), teacher[idx].detach()
            l1 = (s - t).abs().mean(-1)
            cos = nn.functional.cosine_similarity(s, t, dim=-1)
            per_frame = l1 - cos
            if frame_mask is None:
                total = total + per_frame.mean()
            else:
                w = frame_mask.to(per_frame.dtype)
                total = total + (per_frame * w).sum() / w.sum().clamp_min(1.0)
        return total / len(self.layers)
