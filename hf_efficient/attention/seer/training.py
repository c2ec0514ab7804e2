"""Gate self-distillation: train only the AttnGates so their block map matches the frozen model's own
attention map (2-D max-pooled per block tile, row-normalised), with a KL loss.

Each step runs the frozen decoder over windows of concatenated corpus text with every gate in
``capture="distill"`` mode: attention stays dense (the model is unchanged), the pooled-map kernel
(Triton on CUDA, the reference on CPU) yields the target, and each layer's KL is recorded. Only gate
parameters get gradients. Checkpoints (gates + optimizer + schedule + loss history) make a run resumable;
the data order depends only on ``seed`` and the step number, so a resumed run sees the same windows.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import SeerAttentionConfig
from .io import attach_gates, gates_of, load_gates, save_gates

logger = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
OPT_NAME = "optimizer.safetensors"


@contextmanager
def capture(model, mode: str):
    """Put every gate in ``mode`` ('distill' or 'recall') and yield the gates; records are cleared."""
    gates = gates_of(model)
    for g in gates:
        g.capture, g.records = mode, []
    try:
        yield gates
    finally:
        for g in gates:
            g.capture = None


def _windows(ids: torch.Tensor, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    from ...data import sample_windows

    return sample_windows(ids, batch, seq_len, seed=seed * 1_000_003 + step)


def _schedule(steps: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return f


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_NAME).is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _save_checkpoint(root: Path, model, opt, sched, step: int, history: list[float], settings: dict,
                     keep: int = 2) -> Path:
    from safetensors.torch import save_file

    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_gates(model, tmp)
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = {}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, tmp / OPT_NAME)
    (tmp / STATE_NAME).write_text(json.dumps({"step": step, "history": history, "settings": settings,
                                              "scheduler_last_epoch": sched.last_epoch}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model, opt) -> dict:
    from safetensors.torch import load_file

    load_gates(model, path)
    state = json.loads((path / STATE_NAME).read_text())
    tensors = load_file(path / OPT_NAME)
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = v.to(p.device) if name != "step" else v
    return state


def train_gates(model, ids: torch.Tensor, *, config: SeerAttentionConfig | None = None, seq_len: int = 1024,
                steps: int = 100, batch_size: int = 1, lr: float = 1e-3, warmup: int | None = None,
                checkpoint_dir: str | os.PathLike | None = None, save_every: int = 0, resume: bool = True,
                seed: int = 0, progress: bool = True) -> list[float]:
    """Train SeerAttention gates on ``model`` (frozen) by self-distillation; returns the per-step loss.

    @ids: 1-D LongTensor of corpus tokens (e.g. ``data.token_ids(tok, "train")``); windows of ``seq_len``
    tokens are drawn from it. Gates are attached (fresh, from ``config``) when the model has none.
    With ``checkpoint_dir``, a checkpoint is written every ``save_every`` steps (and at the end) and,
    if ``resume``, training continues from the newest one found there. Save the result with
    :func:`save_gates`.
    """
    for name, v in (("seq_len", seq_len), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"train_gates: {name} must be a positive integer, got {v!r}")
    if ids.dim() != 1 or ids.numel() <= seq_len:
        raise ValueError(f"train_gates: need a 1-D token tensor longer than seq_len={seq_len}, got shape "
                         f"{tuple(ids.shape)}")
    if not lr > 0:
        raise ValueError(f"train_gates: lr must be > 0, got {lr}")
    try:
        gates = gates_of(model)
        if config is not None and gates[0].config != config:
            raise ValueError("train_gates: the model already has gates with a different config; pass config=None "
                             "to continue training them")
    except ValueError as e:
        if "different config" in str(e):
            raise
        gates = attach_gates(model, config, seed=seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for g in gates for p in g.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup))
    settings = {"seq_len": seq_len, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                "seed": seed}
    root = Path(checkpoint_dir) if checkpoint_dir else None
    start, history = 0, []
    if root is not None and resume and _checkpoints(root):
        ckpt = _checkpoints(root)[-1]
        state = _load_checkpoint(ckpt, model, opt)
        gates = gates_of(model)  # load_gates replaced the modules: point the optimizer at the new tensors
        new_params = [p for g in gates for p in g.parameters()]
        for old, new in zip(params, new_params):
            new.requires_grad_(True)
            if old in opt.state:
                opt.state[new] = opt.state.pop(old)
        opt.param_groups[0]["params"] = new_params
        params = new_params
        start, history = state["step"], list(state["history"])
        sched.last_epoch = start  # replay the schedule without stepping (no optimizer step has run yet)
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * _schedule(steps, warmup)(start)
        logger.info("resumed gate training from %s (step %d)", ckpt, start)
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    bar = tqdm(range(start, steps), desc="train-gate", disable=not progress, initial=start, total=steps)
    for step in bar:
        batch = _windows(ids, batch_size, seq_len, seed, step).to(device)
        with capture(model, "distill") as gs:
            with torch.no_grad():  # the base model is frozen; gates re-enable grad for their own part
                decoder(input_ids=batch, use_cache=False)
            loss = torch.stack([r for g in gs for r in g.records]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        bar.set_postfix(kl=f"{history[-1]:.4f}")
        done = step + 1
        if root is not None and ((save_every and done % save_every == 0) or done == steps):
            _save_checkpoint(root, model, opt, sched, done, history, settings)
    for p in params:
        p.requires_grad_(False)
    return history


@torch.no_grad()
def attention_recall(model, windows: torch.Tensor) -> dict:
    """Mean share of the true attention mass that the selected blocks keep, and the kept-block density
    (kept / causal blocks), over every layer, head and query of ``windows`` (B, S) under the current
    block-selection settings."""
    device = next(model.parameters()).device
    with capture(model, "recall") as gs:
        for w in windows:
            model.get_decoder()(input_ids=w[None].to(device), use_cache=False)
        recs = [r for g in gs for r in g.records]
    return {"recall": sum(r["recall"] for r in recs) / len(recs),
            "density": sum(r["density"] for r in recs) / len(recs),
            "per_layer_recall": [sum(r["recall"] for r in g.records) / max(1, len(g.records)) for g in gs]}
