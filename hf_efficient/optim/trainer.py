"""AdamA in ``transformers.Trainer``.

One-line switch of an existing gradient-accumulation recipe::

    trainer = Trainer(model=model, args=args, ..., optimizers=adama_optimizers(model, args))

builds AdamA with Trainer's own parameter groups (no weight decay on biases/norms), ``args``'
learning rate, betas, eps, weight decay and ``gradient_accumulation_steps`` (N), after checking the
arguments AdamA cannot honour. Trainer then makes its usual LR scheduler for it, and saves/restores
its state in checkpoints (``AdamA.state_dict`` round-trips exactly).

A hand-built AdamA goes through ``Trainer(optimizers=(AdamA(...), None), callbacks=[AdamACallback()])``:
the callback runs the same checks at ``on_train_begin``, sets N from ``args``, logs AdamA's
gradient norm in place of Trainer's (which sees no gradients), and under multi-process training
folds the DDP-reduced gradients after each micro-batch.
"""
from __future__ import annotations

import logging

from transformers import TrainerCallback

from .adama import AdamA

logger = logging.getLogger(__name__)

CLIPPING = ("refuse", "per_parameter")


def _check_args(args, clipping: str) -> None:
    if clipping not in CLIPPING:
        raise ValueError(f"AdamA: clipping={clipping!r} is invalid; allowed: {CLIPPING}")
    if args.max_grad_norm and args.max_grad_norm > 0 and clipping == "refuse":
        raise ValueError(
            f"AdamA frees each gradient during backward, so Trainer's global-norm clipping "
            f"(max_grad_norm={args.max_grad_norm}) cannot be applied. Set TrainingArguments(max_grad_norm=0), "
            f"or clipping='per_parameter' to clip each parameter's micro-batch gradient to that norm instead.")
    if args.fp16:
        raise ValueError("AdamA: fp16=True uses loss scaling (GradScaler), whose scaled gradients AdamA would fold "
                         "before unscaling; use bf16=True or fp32")
    if args.world_size > 1:
        kw = getattr(args.accelerator_config, "gradient_accumulation_kwargs", None) or {}
        if args.gradient_accumulation_steps > 1 and not kw.get("sync_each_batch", False):
            raise ValueError(
                "AdamA under multi-process training needs every micro-batch's gradient reduced before it is folded: "
                "set TrainingArguments(accelerator_config={'gradient_accumulation_kwargs': {'sync_each_batch': True}})"
                " (this costs one gradient all-reduce per micro-batch instead of one per step)")


def adama_optimizers(model, args, clipping: str = "refuse", **adama_kwargs):
    """``(AdamA, None)`` for ``Trainer(optimizers=...)``, configured from ``args`` (TrainingArguments).

    ``clipping='per_parameter'`` turns ``args.max_grad_norm`` into AdamA's per-parameter, per-micro-batch
    clip; the default refuses a set ``max_grad_norm`` with a ValueError. Extra keywords go to AdamA
    (e.g. ``state_bits=8``). Under multi-process training, use with :class:`AdamACallback`.
    """
    from transformers import Trainer

    _check_args(args, clipping)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
              accumulation_steps=args.gradient_accumulation_steps, fold_on_hook=args.world_size <= 1)
    if clipping == "per_parameter" and args.max_grad_norm and args.max_grad_norm > 0:
        kw["per_param_clip"] = args.max_grad_norm
    kw.update(adama_kwargs)
    return AdamA(groups, **kw), None


def _unwrap(opt):
    while opt is not None and not isinstance(opt, AdamA) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class AdamACallback(TrainerCallback):
    """Checks and glue for AdamA under Trainer (see the module docstring).

    Args:
        clipping: ``"refuse"`` (default; ValueError when ``max_grad_norm > 0``) or ``"per_parameter"``
            (AdamA clips each parameter's micro-batch mean gradient to ``max_grad_norm``).
        log_grad_norm: replace Trainer's ``grad_norm`` log (always 0: gradients are gone when it looks)
            by AdamA's RMS micro-batch gradient norm (the true global norm when N = 1).
    """

    def __init__(self, clipping: str = "refuse", log_grad_norm: bool = True):
        if clipping not in CLIPPING:
            raise ValueError(f"AdamACallback: clipping={clipping!r} is invalid; allowed: {CLIPPING}")
        self.clipping = clipping
        self.log_grad_norm = log_grad_norm
        self.opt: AdamA | None = None
        self._last_norm: float | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if not isinstance(opt, AdamA):
            raise ValueError(f"AdamACallback needs Trainer's optimizer to be AdamA, got {type(opt).__name__}")
        _check_args(args, self.clipping)
        if self.clipping == "per_parameter" and args.max_grad_norm and args.max_grad_norm > 0:
            opt.per_param_clip = args.max_grad_norm
        if opt.accumulation_steps != args.gradient_accumulation_steps:
            logger.info("AdamA: accumulation_steps %d -> %d (TrainingArguments.gradient_accumulation_steps)",
                        opt.accumulation_steps, args.gradient_accumulation_steps)
            opt.accumulation_steps = args.gradient_accumulation_steps
        if args.world_size > 1 and opt.fold_on_hook and opt.process_group is None:
            # The model is DDP-wrapped: fold the reduced gradients after each micro-batch instead.
            opt.remove_hooks()
        opt.track_grad_norm = self.log_grad_norm
        self.opt = opt

    def on_substep_end(self, args, state, control, **kwargs):
        if self.opt is not None and not self.opt.fold_on_hook:
            self.opt.fold_grads()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.opt is not None and not self.opt.fold_on_hook:
            self.opt.fold_grads()  # the last micro-batch, so the norm below covers it
        if self.opt is not None and self.opt.track_grad_norm:
            self._last_norm = self.opt.pop_grad_norm()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "grad_norm" in logs and self._last_norm is not None:
            logs["grad_norm"] = self._last_norm
            if state.log_history and "grad_norm" in state.log_history[-1]:
                state.log_history[-1]["grad_norm"] = self._last_norm
