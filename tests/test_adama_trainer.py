"""AdamA under transformers.Trainer: one-line switch, accumulation, LR schedule, logging, checkpoints."""
from __future__ import annotations

import pytest
import torch

from hf_efficient.optim import AdamA, AdamACallback, adama_optimizers
from tests.conftest import tiny_llama_config


pytestmark = pytest.mark.usefixtures("one_thread")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=4, seq=16, vocab=256):  # one step per epoch: the loss must fall on repeats
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=4, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, max_grad_norm=0.0, weight_decay=0.1,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _train(tmp_path, optimizers=None, callbacks=None, resume=None, **kw):
    from transformers import Trainer

    model = _model()
    args = _args(tmp_path, **kw)
    opt = optimizers(model, args) if callable(optimizers) else (None, None)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), optimizers=opt, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_one_line_switch_with_one_micro_batch_equals_adamw(tmp_path):
    """N = 1: AdamA under Trainer (its groups, LR schedule, weight decay split) equals Trainer's AdamW."""
    ours = _train(tmp_path / "a", optimizers=adama_optimizers, gradient_accumulation_steps=1)
    ref = _train(tmp_path / "b", gradient_accumulation_steps=1, optim="adamw_torch")
    for (n, p), (_, q) in zip(ours.model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert isinstance(ours.optimizer.optimizer if hasattr(ours.optimizer, "optimizer") else ours.optimizer, AdamA)
    lrs = [h["learning_rate"] for h in ours.state.log_history if "learning_rate" in h]
    assert lrs == [h["learning_rate"] for h in ref.state.log_history if "learning_rate" in h]


def test_accumulation_trains_and_logs_grad_norm(tmp_path):
    trainer = _train(tmp_path, optimizers=lambda m, a: (AdamA(m.parameters(), lr=1e-2), None),
                     callbacks=[AdamACallback()])
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert opt.accumulation_steps == 2  # taken from TrainingArguments
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"]
    assert all(h["grad_norm"] > 0 for h in logs)  # AdamA's norm, not Trainer's 0 over freed gradients
    assert all(p.grad is None for p in trainer.model.parameters())


def test_max_grad_norm_refused_or_per_parameter(tmp_path):
    with pytest.raises(ValueError, match="max_grad_norm"):
        _train(tmp_path / "a", optimizers=adama_optimizers, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        _train(tmp_path / "b", optimizers=lambda m, a: (AdamA(m.parameters()), None), callbacks=[AdamACallback()],
               max_grad_norm=1.0)
    trainer = _train(tmp_path / "c", optimizers=lambda m, a: adama_optimizers(m, a, clipping="per_parameter"),
                     max_grad_norm=0.5, max_steps=1)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert opt.per_param_clip == 0.5


def test_fp16_refused(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0, report_to=[], use_cpu=True)
    args.fp16 = True  # TrainingArguments itself refuses fp16 on CPU at construction
    with pytest.raises(ValueError, match="fp16"):
        adama_optimizers(_model(), args)


def test_checkpoint_resume_is_exact(tmp_path):
    full = _train(tmp_path / "full", optimizers=adama_optimizers)
    _train(tmp_path / "part", optimizers=adama_optimizers, save_strategy="steps", save_steps=2, max_steps=4)
    resumed = _train(tmp_path / "part", optimizers=adama_optimizers, resume=str(tmp_path / "part" / "checkpoint-2"))
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
