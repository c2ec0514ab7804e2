"""Hard-concrete gates (Louizos et al., 2018): a differentiable relaxation of binary keep/drop masks.

A gate group holds one log alpha per unit. In training a mask is sampled as
``z = clamp(sigmoid((log u - log(1-u) + log alpha) / beta) * (r - l) + l, 0, 1)``, which puts real
probability mass on exactly 0 and exactly 1, so the expected number of non-zero units,
``sum P(z > 0) = sum sigmoid(log alpha - beta * log(-l / r))``, is a differentiable L0 norm.
At evaluation the mask is deterministic: the ``round(E[L0])`` units with the largest log alpha keep
their expected-value mask ``clamp(sigmoid(log alpha) * (r - l) + l, 0, 1)``, every other unit is 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class HardConcreteGate(nn.Module):
    """``n`` independent hard-concrete gates.

    Args:
        n: number of units (heads, neurons, channels, or 1 for a whole module).
        init_keep_prob: initial P(z > 0); log alpha starts where that probability holds.
        beta: temperature; ``stretch``: (l, r) with l < 0 < 1 < r.
    """

    def __init__(self, n: int, init_keep_prob: float = 0.9, beta: float = 2.0 / 3.0,
                 stretch: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        if n < 1:
            raise ValueError(f"n={n!r}: a gate group needs at least one unit")
        self.n, self.beta = int(n), float(beta)
        self.l, self.r = float(stretch[0]), float(stretch[1])
        # P(z>0) = sigmoid(log_alpha - shift): invert it for the requested start.
        self.shift = self.beta * math.log(-self.l / self.r)
        init = math.log(init_keep_prob / (1 - init_keep_prob)) + self.shift
        self.log_alpha = nn.Parameter(torch.full((self.n,), init))

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_i > 0) per unit, shape (n,), differentiable in log alpha."""
        return torch.sigmoid(self.log_alpha - self.shift)

    def expected_l0(self) -> torch.Tensor:
        return self.prob_nonzero().sum()

    def sample(self) -> torch.Tensor:
        """A training mask, shape (n,), values in [0, 1] with atoms at 0 and 1 (reparameterised)."""
        eps = 1e-6
        u = torch.rand_like(self.log_alpha).clamp(eps, 1 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """The evaluation mask, shape (n,): keep-top-round(E[L0]) units at their expected value, others 0."""
        keep = int(round(self.expected_l0().item()))
        mask = (torch.sigmoid(self.log_alpha) * (self.r - self.l) + self.l).clamp(0.0, 1.0)
        if keep < self.n:
            drop = torch.argsort(self.log_alpha)[: self.n - keep]
            mask[drop] = 0.0
        return mask

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta:.3f}, stretch=({self.l}, {self.r})"
