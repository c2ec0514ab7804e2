"""Plain-torch references for every kernel in this package (test oracles and CPU fallbacks)."""
from __future__ import annotations

import torch


def scale_add_reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + y`` computed in fp32 and rounded once to the input dtype."""
    return (alpha * x.float() + y.float()).to(x.dtype)
