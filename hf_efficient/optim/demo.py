"""AdamW + gradient accumulation vs AdamA (fp32 / 8-bit states): one training loop for the
``hf-efficient adama-demo`` command (:mod:`hf_efficient.cli.adama_demo`) and ``benchmarks/adama_memory.py``.

Every method trains the same model (same seed) on the same micro-batches in the same order; peak
memory is CUDA max allocated (CPU: process RSS, which also counts the Python heap and is noisy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

METHODS = ("adamw", "adama", "adama8")


@dataclass
class RunResult:
    method: str
    peak_mb: float
    tokens_per_s: float
    losses: list[float] = field(default_factory=list)
    grad_mb: float = 0.0
    state_mb: float = 0.0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]  # mean of the last 10 % of steps: less noise
        return sum(tail) / len(tail)


def make_optimizer(method: str, model, lr: float, accumulation: int, weight_decay: float = 0.0):
    import torch

    from .adama import AdamA

    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adamw":
        fused = params[0].is_cuda  # the leanest baseline: fused AdamW allocates no state-sized temporaries
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if method in ("adama", "adama8"):
        return AdamA(params, lr=lr, weight_decay=weight_decay, accumulation_steps=accumulation,
                     state_bits=8 if method == "adama8" else 32)
    raise ValueError(f"method={method!r} is invalid; allowed: {METHODS}")


def train_run(method: str, build_model, batches, *, steps: int, accumulation: int, lr: float = 3e-4,
              device: str = "cpu", autocast_dtype=None, warmup_steps: int = 2, max_seconds: float | None = None,
              progress=None) -> RunResult:
    """Train ``build_model()`` for ``steps`` optimizer steps of ``accumulation`` micro-batches taken in
    order from ``batches`` (a list of (B, S) token-id tensors). Returns peak memory, tokens/s (after
    ``warmup_steps``) and the loss of every step (mean over its micro-batches)."""
    import torch

    from ..evaluation import PeakMemory

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model().to(dev).train()
    opt = make_optimizer(method, model, lr, accumulation)
    losses: list[float] = []
    tokens = 0
    t_start = None
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    ac = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    t0 = time.perf_counter()
    with PeakMemory(dev) as mem:
        for step in range(steps):
            if step == warmup_steps:
                sync()
                t_start, tokens = time.perf_counter(), 0
            total = torch.zeros((), device=dev)
            for i in range(accumulation):
                ids = batches[(step * accumulation + i) % len(batches)].to(dev)
                if ac is not None:
                    with ac:
                        loss = model(input_ids=ids, labels=ids).loss / accumulation
                else:
                    loss = model(input_ids=ids, labels=ids).loss / accumulation
                loss.backward()
                total += loss.detach()
                tokens += ids.numel()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(total))
            if progress:
                progress(method, step, losses[-1])
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds and step >= warmup_steps + 1:
                break
        sync()
    elapsed = time.perf_counter() - (t_start or t0)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else 8 * n_params
    res = RunResult(method, mem.peak_bytes / 2**20, tokens / max(elapsed, 1e-9), losses,
                    grad_mb=4 * n_params / 2**20, state_mb=state / 2**20, seconds=time.perf_counter() - t0)
    del model, opt
    return res


def corpus_batches(tokenizer, n: int, batch: int, seqlen: int, seed: int = 0):
    """``n`` micro-batches of shape (batch, seqlen) drawn from the training plays."""
    from ..data import sample_windows, token_ids

    ids = token_ids(tokenizer, "train", max_tokens=max(200_000, 4 * n * batch * seqlen))
    windows = sample_windows(ids, n * batch, seqlen, seed=seed)
    return list(windows.view(n, batch, seqlen))


def format_rows(results: list[RunResult]) -> str:
    base = results[0]
    lines = [f"{'method':8} {'peak MB':>9} {'vs AdamW':>9} {'tok/s':>9} {'vs AdamW':>9} {'final loss':>10} "
             f"{'vs AdamW':>9}"]
    for r in results:
        lines.append(f"{r.method:8} {r.peak_mb:9.1f} {r.peak_mb / base.peak_mb:9.3f} {r.tokens_per_s:9.1f} "
                     f"{r.tokens_per_s / base.tokens_per_s:9.3f} {r.final_loss:10.4f} "
                     f"{r.final_loss / base.final_loss:9.4f}")
    return "\n".join(lines)
