"""One resumable BitDistiller run end to end (what ``hf-efficient distill`` calls).

Layout of ``out_dir``::

    data/          the teacher-generated training set (datasets.save_to_disk); reused when present
    checkpoints/   Trainer checkpoints (latent float weights, optimizer, RNG): a rerun resumes the latest
    model/         the exported packed checkpoint (from_pretrained after ``import hf_efficient``)
    distill_config.json
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

from .config import BitDistillerConfig

logger = logging.getLogger(__name__)


def _latest_checkpoint(folder: Path) -> str | None:
    cks = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(cks, key=lambda p: int(p.name.split("-")[-1]))) if cks else None


def distill(model_path: str | os.PathLike | None, config: BitDistillerConfig, out_dir: str | os.PathLike, *,
            steps: int = 200, batch_size: int = 8, lr: float = 2e-5, samples: int = 256, prompt_len: int = 32,
            gen_len: int = 224, device: str = "cpu", dtype: torch.dtype = torch.float32, save_every: int = 50,
            resume: bool = True, prompts: list[str] | None = None, seed: int = 0, progress: bool = True):
    """Generate data, train with :class:`BitDistillerCallback`, export; returns ``(model, tokenizer, out/model)``.

    A second call with the same ``out_dir`` reuses the data and resumes from the latest checkpoint
    (``resume=False`` starts over). The float teacher is reloaded from ``model_path`` each time.
    """
    from transformers import Trainer, TrainingArguments

    from ..models import load_model
    from .data import generate_training_data
    from .fake_quant import convert
    from .trainer import BitDistillerCallback

    for name, v in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"distill: {name}={v!r} must be a positive int")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "distill_config.json"
    if resume and saved_cfg.is_file() and BitDistillerConfig.from_dict(json.loads(saved_cfg.read_text())) != config:
        raise ValueError(f"{out} holds a run with a different BitDistillerConfig ({saved_cfg}); use another "
                         f"folder or resume=False")
    saved_cfg.write_text(config.to_json() + "\n")
    model, tok = load_model(model_path, dtype=dtype, device=device)
    data_dir = out / "data"
    if (data_dir / "dataset_info.json").is_file():
        import datasets

        data = datasets.load_from_disk(str(data_dir))
    else:
        data = generate_training_data(model, tok, n_samples=samples, prompt_len=prompt_len, gen_len=gen_len,
                                      prompts=prompts, seed=seed, progress=progress)
        data.save_to_disk(str(data_dir))
    train = data.select_columns(["input_ids"]).map(lambda r: {"labels": r["input_ids"]})
    ck_dir = out / "checkpoints"
    last = _latest_checkpoint(ck_dir) if resume else None
    teacher = copy.deepcopy(model) if config.needs_teacher else None
    calib = None
    if config.clip and last is None:
        calib = torch.tensor(data["input_ids"][: config.clip_samples])[:, : config.clip_seqlen]
    args = TrainingArguments(output_dir=str(ck_dir), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=steps // 30, report_to=[],
                             save_strategy="steps", save_steps=save_every, save_total_limit=2,
                             logging_steps=max(1, min(10, steps // 10)), disable_tqdm=not progress, seed=seed,
                             use_cpu=torch.device(device).type == "cpu", bf16=dtype == torch.bfloat16)
    cb = BitDistillerCallback(config, teacher=teacher, calibration=calib)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    if last:
        logger.info("resuming BitDistiller run from %s", last)
    trainer.train(resume_from_checkpoint=last)
    model.eval()
    convert(model, config)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return model, tok, out / "model"
