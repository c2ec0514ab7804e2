"""Hand-written reference of AdamA's rule (independent of hf_efficient.optim), shared by the AdamA tests."""
from __future__ import annotations

import math

import torch


class RefAdamA:
    """AdamA by the formula, in float64, one optimizer step at a time.

    ``step(micro)``: ``micro`` is a list (per micro-batch) of lists (per parameter) of gradient
    contributions h_i, or None where that parameter got no gradient.
    """

    def __init__(self, params0, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, n=None, clip=None):
        self.lr, self.betas, self.eps, self.wd, self.n, self.clip = lr, betas, eps, weight_decay, n, clip
        self.params = [p.detach().double().clone() for p in params0]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0] * len(self.params)

    def step(self, micro):
        b1, b2 = self.betas
        big_n = self.n or len(micro)
        got = [False] * len(self.params)
        for grads in micro:
            for j, h in enumerate(grads):
                if h is None:
                    continue
                h = h.double()
                if self.clip is not None:
                    h = h * min(1.0, self.clip / (float(h.norm()) * big_n + 1e-6))
                if not got[j]:
                    self.m[j] *= b1
                    self.v[j] *= b2
                    got[j] = True
                self.m[j] += (1 - b1) * h
                self.v[j] += (1 - b2) * big_n * h * h
        for j, p in enumerate(self.params):
            if not got[j]:
                continue
            self.t[j] += 1
            mhat = self.m[j] / (1 - b1 ** self.t[j])
            vhat = self.v[j] / (1 - b2 ** self.t[j])
            self.params[j] = p * (1 - self.lr * self.wd) - self.lr * mhat / (vhat.sqrt() + self.eps)


def mlp(seed=0, d=16, hidden=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d))


def micro_grads(model, batches, n, params=None):
    """Gradient contributions (loss / n) of each micro-batch, computed without any optimizer
    (at ``params`` when given)."""
    if params is not None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), params):
                p.copy_(q)
    out = []
    for x, y in batches:
        model.zero_grad()
        ((model(x) - y).pow(2).mean() / n).backward()
        out.append([None if p.grad is None else p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return out


def batches(seed, count, d=16, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)) for _ in range(count)]


def close(a, b, rtol=1e-5, atol=1e-6):
    return all(torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol) for x, y in zip(a, b))


def max_rel(a, b):
    return max(float((x.double() - y.double()).norm() / (y.double().norm() + 1e-30)) for x, y in zip(a, b))


__all__ = ["RefAdamA", "mlp", "micro_grads", "batches", "close", "max_rel", "math"]
