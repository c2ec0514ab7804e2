"""BitDistiller in ``transformers.Trainer``: one callback switches an existing recipe to QAT + self-distillation.

::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[BitDistillerCallback(BitDistillerConfig(bits=2, group_size=64))])

At ``on_train_begin`` the callback (1) keeps a frozen float copy of the model as the teacher (unless one
is given), (2) runs the clipping init on the first training sequences and wraps the linears in fake
quantization (unless the model was already prepared with :func:`~hf_efficient.distill.prepare_qat`),
(3) estimates CAKLD's ``β`` on the first batches, and (4) installs a forward hook on the model that
replaces ``outputs.loss`` with the distillation loss. The model's own loss path stays in charge of
normalisation, so Trainer's gradient-accumulation handling (``num_items_in_batch``), AdamA
(``optimizers=adama_optimizers(...)``) and peft LoRA work unchanged. Parameters are wrapped, never
copied, so an optimizer Trainer already built keeps training them.

``teacher="self"`` uses the trained model with fake quantization off (and peft adapters disabled) as the
teacher: no second copy in memory, but its float weights are the clipped, trained latent weights, so the
teacher drifts; with LoRA on a frozen base it is exactly the (clipped) float model.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from transformers import TrainerCallback

from .config import BitDistillerConfig
from .fake_quant import fake_quant_disabled, fake_quant_layers, prepare_qat
from .loss import distill_loss, teacher_confidence, token_mask

logger = logging.getLogger(__name__)


def _first_batches(dataloader, n: int) -> list[dict]:
    # A separate iterator under a forked RNG: the training run sees the same batch order as without us.
    out = []
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(dataloader):
            if i >= n:
                break
            out.append(batch)
    return out


class BitDistillerCallback(TrainerCallback):
    """QAT with self-distillation (CAKLD by default) as a Trainer callback; see the module docstring.

    Args:
        config: a :class:`BitDistillerConfig`.
        teacher: None (default: a frozen float copy taken before preparing the model), ``"self"`` or a
            float model with the same vocabulary. Ignored for ``loss="ce"``.
        calibration: ``(n, seqlen)`` token windows for the clipping init; default: the first
            ``config.clip_samples`` training sequences. Not used when the model is already prepared or when
            resuming from a checkpoint (the checkpoint holds the clipped, trained weights).
    """

    def __init__(self, config: BitDistillerConfig, teacher=None, calibration: torch.Tensor | None = None):
        if not isinstance(config, BitDistillerConfig):
            raise ValueError(f"BitDistillerCallback: config must be a BitDistillerConfig, got {type(config).__name__}")
        if isinstance(teacher, str) and teacher != "self":
            raise ValueError(f"BitDistillerCallback: teacher={teacher!r} is invalid; use None, 'self' or a model")
        self.config = config
        self.teacher = teacher
        self.calibration = calibration
        self.beta = config.beta
        self._model = None
        self._handle = None
        self._in_teacher = False

    # --- setup -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("BitDistillerCallback needs Trainer to pass the model to on_train_begin")
        cfg = self.config
        resuming = state.global_step > 0
        if not fake_quant_layers(model):
            if cfg.needs_teacher and self.teacher is None:
                if resuming:
                    raise ValueError("BitDistillerCallback: resuming from a checkpoint with teacher=None would copy "
                                     "the trained weights as the teacher; pass teacher=<the float model>")
                self.teacher = self._frozen_copy(model)
            calib = self.calibration
            if cfg.clip and calib is None and not resuming:
                calib = self._calibration_from(train_dataloader)
            prepare_qat(model, cfg, None if resuming else calib, progress=not args.disable_tqdm)
        elif cfg.needs_teacher and self.teacher is None:
            raise ValueError("BitDistillerCallback: the model is already fake-quantized, so its float teacher cannot "
                             "be copied from it; pass teacher=<float model> or teacher='self'")
        if cfg.needs_teacher and self.teacher != "self":
            self.teacher.to(next(model.parameters()).device).eval()
            self.teacher.requires_grad_(False)
        if cfg.loss == "cakld" and self.beta is None:
            self.beta = self._estimate_beta(model, train_dataloader)
            logger.info("BitDistiller: CAKLD beta = %.4f (teacher's mean top-1 probability)", self.beta)
        self._model = model
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.beta is not None and "loss" in logs:
            logs["cakld_beta"] = round(float(self.beta), 4)

    @staticmethod
    def _frozen_copy(model):
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        return teacher.eval()

    def _calibration_from(self, dataloader) -> torch.Tensor | None:
        if dataloader is None:
            logger.warning("BitDistiller: no train dataloader to take clipping calibration from; skipping clipping")
            return None
        rows, cfg = [], self.config
        with torch.random.fork_rng(devices=[]):
            for batch in dataloader:
                ids = batch["input_ids"]
                rows += [r[: cfg.clip_seqlen] for r in ids.cpu()]
                if len(rows) >= cfg.clip_samples:
                    break
        n = min(len(r) for r in rows)
        return torch.stack([r[:n] for r in rows[: cfg.clip_samples]])

    @torch.no_grad()
    def _estimate_beta(self, model, dataloader) -> float:
        if dataloader is None:
            raise ValueError("BitDistillerCallback: loss='cakld' with beta=None needs the train dataloader to "
                             "estimate beta; set BitDistillerConfig(beta=...)")
        total, count = 0.0, 0
        for batch in _first_batches(dataloader, self.config.beta_batches):
            ids = batch["input_ids"]
            logits = self._teacher_logits(model, ids, batch.get("attention_mask"))
            s, c = teacher_confidence(logits, token_mask(batch.get("labels"), batch.get("attention_mask"),
                                                         ids.shape))
            total, count = total + s, count + c
        if count == 0:
            raise ValueError("BitDistillerCallback: no scored tokens in the first batches to estimate beta")
        return total / count

    # --- every step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_logits(self, model, input_ids, attention_mask) -> torch.Tensor:
        self._in_teacher = True
        try:
            if self.teacher == "self":
                adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                with adapters, fake_quant_disabled(model):
                    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            else:
                dev = next(self.teacher.parameters()).device
                am = attention_mask.to(dev) if attention_mask is not None else None
                out = self.teacher(input_ids=input_ids.to(dev), attention_mask=am, use_cache=False)
        finally:
            self._in_teacher = False
        return out.logits

    def _hook(self, module, args, kwargs, output):
        if self._in_teacher:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or getattr(output, "logits", None) is None:
            return None
        labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
        teacher = self._teacher_logits(module, input_ids, mask) if self.config.needs_teacher else None
        output["loss"] = distill_loss(output.logits, teacher, labels, mask, kind=self.config.loss, beta=self.beta,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        return output
