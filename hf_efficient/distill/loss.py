"""Distillation losses of BitDistiller: forward KL, reverse KL, their confidence-aware blend (CAKLD), and CE.

Per token ``t`` with teacher distribution ``P_t`` and student ``P_s`` over the vocabulary:

* ``fkl``   ``KL(P_t ‖ P_s) = Σ P_t (log P_t − log P_s)``   (mean-seeking)
* ``rkl``   ``KL(P_s ‖ P_t) = Σ P_s (log P_s − log P_t)``   (mode-seeking)
* ``cakld`` ``β · KL(P_s ‖ P_t) + (1 − β) · KL(P_t ‖ P_s)``, ``β`` = the teacher's mean top-1 probability
  on the training data (:func:`teacher_confidence`): a confident teacher favours the mode-seeking term.
* ``ce``    cross-entropy of the student on the labels (the plain-QAT baseline; no teacher).

Logits at position ``i`` predict token ``i + 1``; a position counts when ``labels[i + 1] != -100`` (or,
without labels, when ``attention_mask[i + 1]`` is set). The loss is the sum over counted positions divided
by ``num_items_in_batch`` when given (Trainer's gradient-accumulation-correct normaliser, which counts the
same positions across the accumulated micro-batches), else by the number of counted positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LOSSES

IGNORE_INDEX = -100


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q)`` along the last dim for logits ``(..., V)`` -> ``(...)``, computed in float32."""
    lp = F.log_softmax(p_logits.float(), dim=-1)
    lq = F.log_softmax(q_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def token_mask(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape) -> torch.Tensor:
    """Bool ``(B, S-1)``: which of the positions ``0..S-2`` are scored."""
    if labels is not None:
        return labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        return attention_mask[:, 1:].bool()
    return torch.ones(shape[0], shape[1] - 1, dtype=torch.bool)


def per_token_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   labels: torch.Tensor | None = None, beta: float | None = None) -> torch.Tensor:
    """Loss of each position ``(B, S-1)`` (logits ``(B, S, V)``; position ``i`` predicts token ``i+1``)."""
    if kind not in LOSSES:
        raise ValueError(f"loss={kind!r} is not valid: one of {LOSSES}")
    s = student_logits[:, :-1]
    if kind == "ce":
        if labels is None:
            raise ValueError("loss='ce' needs labels")
        tgt = labels[:, 1:].to(s.device)
        return F.cross_entropy(s.float().flatten(0, 1), tgt.flatten().clamp(min=0), reduction="none").view(tgt.shape)
    if teacher_logits is None:
        raise ValueError(f"loss={kind!r} needs teacher logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    t = teacher_logits[:, :-1].to(s.device)
    if kind == "fkl":
        return kl_per_token(t, s)
    if kind == "rkl":
        return kl_per_token(s, t)
    if beta is None or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"loss='cakld' needs beta in [0, 1], got {beta!r}")
    return float(beta) * kl_per_token(s, t) + (1.0 - float(beta)) * kl_per_token(t, s)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels=None,
                 attention_mask=None, *, kind: str = "cakld", beta: float | None = None,
                 num_items_in_batch=None) -> torch.Tensor:
    """Scalar loss over the scored positions (see the module docstring for masking and normalisation)."""
    per = per_token_loss(kind, student_logits, teacher_logits, labels, beta)
    mask = token_mask(labels, attention_mask, student_logits.shape[:2]).to(per.device)
    total = (per * mask).sum()
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


@torch.no_grad()
def teacher_confidence(teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(sum of top-1 probabilities, count)`` over positions ``0..S-2`` selected by ``mask`` (B, S-1)."""
    p = F.softmax(teacher_logits[:, :-1].float(), dim=-1).amax(-1)
    if mask is not None:
        p = p[mask.to(p.device)]
    return float(p.sum()), int(p.numel())
