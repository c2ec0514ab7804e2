"""``PruningTrainer``: a transformers ``Trainer`` that learns L0 structure masks under a size target.

Objective per step (Lagrangian relaxation of "reach sparsity t"):
``ctc_weight * CTC + distill_weight * layerwise_distill + lambda1 * (s - t) + lambda2 * (s - t)^2``,
where ``s`` is the gates' differentiable expected sparsity and ``t`` the target, ramped from the
gates' initial expected sparsity to ``target_sparsity``. The model,
the gates and the distillation maps descend on it; lambda1/lambda2 *ascend* (their gradient is
negated), so the penalty grows until the expected size meets the target.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer

from .config import L0PruningConfig
from .distill import LayerwiseDistiller
from .parakeet import ParakeetL0Pruner, prune_parakeet


def _constant(step: int) -> float:
    return 1.0


class PruningTrainer(Trainer):
    """Trainer for a ParakeetForCTC that adds L0 gates, a frozen teacher and the Lagrangian.

    Args (beyond ``Trainer``'s):
        pruning_config: :class:`L0PruningConfig`.
        teacher: the model to distil from; default a frozen copy of ``model`` taken before gating.
    After ``train()``, :meth:`pruned_model` returns the physically smaller model. Logs gain
    ``expected_sparsity``, ``target_sparsity``, ``lambda1``, ``lambda2``, ``ctc_loss``,
    ``distill_loss`` and ``lagrangian`` (averages since the last log).
    Batches must carry ``input_features``, ``attention_mask`` and ``labels`` (set
    ``remove_unused_columns=False`` when the dataset has other columns).
    """

    def __init__(self, *args, pruning_config: L0PruningConfig | None = None, teacher=None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("model=None: PruningTrainer needs the ParakeetForCTC to prune")
        if (kwargs.get("optimizers") or (None, None))[0] is not None:
            raise ValueError("optimizers=(optimizer, ...): PruningTrainer builds its optimizer itself (it adds the "
                             "gates, distillation maps and lambdas); pass optimizer_cls_and_kwargs instead")
        self.pruning_config = pruning_config or L0PruningConfig()
        # The teacher must be copied before the pruner's hooks exist: deepcopy would copy them.
        teacher = teacher if teacher is not None else copy.deepcopy(model)
        super().__init__(*args, **kwargs)
        # Every term of our loss is a per-batch mean: Trainer must divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        dev = next(self.model.parameters()).device
        self.teacher = teacher.to(dev).eval().requires_grad_(False)
        self.pruner = ParakeetL0Pruner(self.model, self.pruning_config).to(dev)
        n_layers = self.pruner.num_layers
        layers = self.pruning_config.distill_layers
        layers = tuple(range(1, n_layers + 1)) if layers is None else tuple(i + 1 for i in layers)
        hidden = self.model.config.encoder_config.hidden_size
        self.distiller = LayerwiseDistiller(hidden, layers).to(dev)
        self.lambdas = nn.Parameter(torch.zeros(2, device=dev))
        self.lambdas.register_hook(lambda g: -g)  # gradient ascent on lambda
        with torch.no_grad():
            self.start_sparsity = float(self.pruner.expected_sparsity())
        self._pruning_logs: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        cfg = self.pruning_config
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        extra = [
            {"params": list(self.pruner.parameters()), "lr": cfg.gate_lr, "weight_decay": 0.0},
            {"params": list(self.distiller.parameters()), "lr": self.args.learning_rate, "weight_decay": 0.0},
            # no momentum: lambda must turn as soon as the gap changes sign, not tens of steps later
            {"params": [self.lambdas], "lr": cfg.lambda_lr, "weight_decay": 0.0, "betas": (0.0, 0.999)},
        ]
        for g in extra:
            if any(id(p) in ids for p in g["params"]):
                raise ValueError("the pruning parameters are already in the optimizer")
            opt.add_param_group(g)
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        sched = super().create_scheduler(num_training_steps, optimizer)
        # The gates, maps and lambdas keep a constant rate: a decayed gate rate freezes the masks before the
        # expected size has settled on the target (seen: 0.57 for a 0.5 target with linear decay).
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is not None:
            for i in range(len(lambdas) - 3, len(lambdas)):
                lambdas[i] = _constant
        return sched

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.pruning_config
        outputs = model(**inputs, output_hidden_states=True)
        with torch.no_grad():
            t_out = self.teacher(input_features=inputs["input_features"],
                                 attention_mask=inputs.get("attention_mask"), output_hidden_states=True)
        frame_mask = None
        if inputs.get("attention_mask") is not None:
            frame_mask = self.pruner_model()._get_output_attention_mask(
                inputs["attention_mask"], target_length=outputs.hidden_states[-1].shape[1])
        distill = self.distiller(outputs.hidden_states, t_out.hidden_states, frame_mask)
        s = self.pruner.expected_sparsity()
        target = cfg.target_at(self.state.global_step, self.start_sparsity)
        gap = s - target
        lagrangian = self.lambdas[0] * gap + self.lambdas[1] * gap * gap
        loss = cfg.ctc_weight * outputs.loss + cfg.distill_weight * distill + lagrangian
        if model.training:
            for k, v in (("ctc_loss", outputs.loss), ("distill_loss", distill), ("lagrangian", lagrangian),
                         ("expected_sparsity", s), ("target_sparsity", target),
                         ("lambda1", self.lambdas[0]), ("lambda2", self.lambdas[1])):
                self._pruning_logs[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
        return (loss, outputs) if return_outputs else loss

    def pruner_model(self):
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._pruning_logs and "loss" in logs:
            for k, vals in self._pruning_logs.items():
                logs[k] = round(sum(vals) / len(vals), 5)
            self._pruning_logs.clear()
        super().log(logs, start_time)

    def pruned_model(self):
        """The physically pruned model (a ``PrunedParakeetForCTC``) from the current deterministic masks."""
        return prune_parakeet(self.pruner_model(), self.pruner.masks())
