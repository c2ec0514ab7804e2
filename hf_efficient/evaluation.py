"""Evaluation harness shared by every capability: perplexity, a greedy sample, speed, memory, size.

Each measurement is a small function; :func:`evaluate` runs them all into an :class:`EvalResult`,
and :func:`format_table` / :func:`write_json` report a list of results.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_PROMPT = "Write one sentence about the sea."


# Positions whose logits exist at once while scoring a window. Full-window logits of a 49k-vocabulary model
# at context 2048 are 400 MB, plus as much again for their log-softmax: that, not the model, was the peak
# memory of a small model's evaluation. Chunks also stay above the LUT kernels' decode-size limit
# (kernel.max_lut_rows, 32), so a quantized head takes the same path as it would on the whole window.
LOGIT_CHUNK = 64


def _split_head(model):
    """``(trunk, head)`` with ``model(ids).logits == head(trunk(ids).last_hidden_state)`` for this model, or None.

    The split is checked on a short probe, so a model whose head does more than one linear map (logit
    soft-capping, scaling) or that has no decoder/head accessors falls back to full-window logits.
    """
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if trunk is None or head is None or trunk is model:
        return None
    device = next(model.parameters()).device
    probe = torch.arange(8, device=device)[None] % max(2, int(getattr(model.config, "vocab_size", 2)))
    try:
        split = head(trunk(input_ids=probe, use_cache=False).last_hidden_state)
    except Exception:  # any model whose parts do not take these arguments: not splittable
        return None
    full = model(probe, use_cache=False).logits
    if split.shape != full.shape or not torch.allclose(split.float(), full.float(), rtol=1e-4, atol=1e-4):
        return None
    return trunk, head


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[begin, end)`` ranges covering ``n`` positions, each of ``size`` or more (the remainder joins the last)."""
    bounds = list(range(0, n, size))
    if len(bounds) > 1 and n - bounds[-1] < size:
        bounds.pop()
    return list(zip(bounds, bounds[1:] + [n]))


def _window_nll(model, split, window: torch.Tensor, first: int) -> float:
    """Sum of ``-log p(window[j+1] | window[:j+1])`` over positions ``j >= first`` of one window (1, T)."""
    # use_cache=False: a window is scored once, and its KV cache would be ~100 MB at context 2048 (135M model).
    targets = window[0, 1:]
    if split is None:
        logp = torch.log_softmax(model(window, use_cache=False).logits[0, :-1].float(), dim=-1)
        return -logp[first:].gather(1, targets[first:, None]).double().sum().item()
    trunk, head = split
    hidden = trunk(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
    nll = 0.0
    for a, b in _chunks(hidden.shape[0] - first, LOGIT_CHUNK):
        a, b = a + first, b + first
        logp = torch.log_softmax(head(hidden[a:b]).float(), dim=-1)
        nll -= logp.gather(1, targets[a:b, None]).double().sum().item()
    return nll


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, context: int = 2048, stride: int | None = None,
               progress: bool = True) -> float:
    """Sliding-window perplexity of ``model`` on the 1-D token sequence ``input_ids``.

    The first window scores tokens ``1..context-1``; each later window ends ``stride`` tokens further
    (default ``context // 2``) and scores only its last ``stride`` tokens, so every scored token
    after the first window sees at least ``context - stride`` tokens of history. The first token is
    never scored; every other token is scored exactly once. Logits are computed for
    :data:`LOGIT_CHUNK` scored positions at a time where the model's head can be split off (see
    :func:`_split_head`), so memory does not grow with ``context x vocabulary``.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    n = input_ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    stride = stride or max(1, context // 2)
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, context={context}), got {stride}")
    device = next(model.parameters()).device
    split = _split_head(model)
    n_windows = 1 + max(0, math.ceil((n - context) / stride))
    nll, scored_to = 0.0, 1  # tokens [1, scored_to) are already scored
    for _ in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        end = min(max(scored_to + stride, context), n)
        begin = max(0, end - context)
        window = input_ids[begin:end].to(device)[None]
        nll += _window_nll(model, split, window, scored_to - begin - 1)  # targets[j] is token begin+1+j
        scored_to = end
    assert scored_to == n
    return math.exp(nll / (n - 1))


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    ids = _chat_ids(tokenizer, prompt).to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, prompt_len: int = 128, new_tokens: int = 32, batch: int = 1, repeats: int = 3,
                  vocab_size: int | None = None, seed: int = 0) -> dict[str, float]:
    """Prefill and decode throughput (tokens/s, medians over ``repeats``) on random token prompts.

    Prefill: one forward of ``batch x prompt_len`` tokens. Decode: ``new_tokens`` greedy steps of one
    token each on the KV cache that prefill built, timed on their own (not "generate minus prefill",
    whose difference of two noisy timings can come out near zero or negative on a busy CPU).
    """
    if new_tokens < 1 or prompt_len < 1:
        raise ValueError(f"prompt_len and new_tokens must be >= 1, got {prompt_len} and {new_tokens}")
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    decode_steps(model, ids[:, :8], 2)  # warm-up: lazy inits, allocator, kernel selection
    prefill, decode = [], []
    for _ in range(repeats):
        _sync(device); t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(device); t1 = time.perf_counter()
        decode_steps(model, ids, new_tokens, out)
        _sync(device); t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(t2 - t1)
    return {"prefill_tok_s": batch * prompt_len / statistics.median(prefill),
            "decode_tok_s": batch * new_tokens / statistics.median(decode)}


def decode_steps(model, ids: torch.Tensor, steps: int, out=None) -> None:
    """``steps`` greedy one-token forwards on the cache of ``out`` (a prefill of ``ids``; run here if None)."""
    out = out if out is not None else model(ids, use_cache=True)
    name = cache_kwarg()
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(nxt, use_cache=True, **{name: getattr(out, name)})


def cache_kwarg() -> str:
    """The name under which forwards take the KV cache and outputs carry it: ``cache`` since transformers 5.24
    (``past_key_values`` there is deprecated, and removed in 5.40), ``past_key_values`` before (forward
    parameter and output field were renamed together)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA max allocated, or CPU RSS sampled every ``interval`` s."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        proc = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def state_dict_bytes(model) -> int:
    """Bytes of the tensors ``save_pretrained`` would write (tied/shared storage counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) if t.device.type != "meta" \
            else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def dir_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@dataclass
class EvalResult:
    name: str
    ppl: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_mem_mb: float | None = None
    size_mb: float | None = None
    sample: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model, tokenizer, name: str, eval_ids: torch.Tensor | None, *, context: int = 2048,
             stride: int | None = None, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3,
             sample_prompt: str | None = DEFAULT_PROMPT, size_bytes: int | None = None,
             progress: bool = True, phase=None) -> EvalResult:
    """Run every measurement on one model. ``eval_ids=None`` skips perplexity; ``sample_prompt=None`` the sample.

    ``phase``: optional context-manager factory ``phase(name)`` wrapped around each measurement ("perplexity",
    "speed", "sample"), e.g. to announce it and time it."""
    device = next(model.parameters()).device
    res = EvalResult(name=name)
    phase = phase or (lambda _name: contextlib.nullcontext())
    with PeakMemory(device) as mem:
        if eval_ids is not None:
            with phase("perplexity"):
                res.ppl = perplexity(model, eval_ids, context=context, stride=stride, progress=progress)
        if new_tokens > 0:
            with phase("speed"):
                res.__dict__.update(measure_speed(model, prompt_len=prompt_len, new_tokens=new_tokens,
                                                  repeats=repeats))
    res.peak_mem_mb = mem.peak_bytes / 2**20
    res.size_mb = (size_bytes if size_bytes is not None else state_dict_bytes(model)) / 2**20
    if sample_prompt:
        with phase("sample"):
            res.sample = generate_sample(model, tokenizer, sample_prompt)
    return res


class KernelCensus:
    """Counts which implementation ran each QuantLinear forward inside a ``with`` block.

    Every registered fast path is wrapped to count the calls it served (not the ones it declined), and the
    plain-torch reference path (dequantize + matmul) is counted too, so a report can say which kernel ran
    instead of which one was meant to. ``counts``: {implementation name: calls}. Float models count nothing.
    """

    REFERENCE = "reference (dequantize + matmul)"

    def __init__(self):
        self.counts: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def __enter__(self):
        from .quantization import linear

        self._linear = linear
        self._saved_paths = {k: list(v) for k, v in linear._FAST_PATHS.items()}
        for key, entries in linear._FAST_PATHS.items():
            linear._FAST_PATHS[key] = [(n, self._wrap(n, fn)) for n, fn in entries]
        self._saved_ref = linear.QuantLinear.reference_forward
        census, ref = self, self._saved_ref

        def reference_forward(layer, x):
            census._count(KernelCensus.REFERENCE)
            return ref(layer, x)

        linear.QuantLinear.reference_forward = reference_forward
        return self

    def _wrap(self, name, fn):
        def counted(x, layer):
            y = fn(x, layer)
            if y is not None:
                self._count(name)
            return y

        return counted

    def __exit__(self, *exc):
        self._linear._FAST_PATHS.clear()
        self._linear._FAST_PATHS.update(self._saved_paths)
        self._linear.QuantLinear.reference_forward = self._saved_ref
        return False

    def summary(self) -> str:
        """``"lut_cpu 96 %, reference (dequantize + matmul) 4 %"`` (share of QuantLinear calls), or "float"."""
        total = sum(self.counts.values())
        if not total:
            return "float (torch matmul)"
        return ", ".join(f"{n} {100 * c / total:.0f} %" for n, c in sorted(self.counts.items(), key=lambda kv: -kv[1]))


_COLUMNS = [("name", "model", "{}"), ("ppl", "PPL", "{:.3f}"), ("prefill_tok_s", "prefill tok/s", "{:.1f}"),
            ("decode_tok_s", "decode tok/s", "{:.1f}"), ("peak_mem_mb", "peak MiB", "{:.0f}"),
            ("size_mb", "size MiB", "{:.1f}")]


def format_table(results: list[EvalResult]) -> str:
    """Markdown table of the numeric columns (blank where a row did not measure one)."""
    def cell(r, key, fmt):
        v = getattr(r, key)
        return "" if v is None else fmt.format(v)

    lines = ["| " + " | ".join(h for _, h, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in _COLUMNS) + " |" for r in results]
    return "\n".join(lines)


def environment() -> dict:
    """Device, date and versions for result files."""
    import platform

    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_json(results: list[EvalResult], path: str | os.PathLike, settings: dict | None = None) -> None:
    payload = {"environment": environment(), "settings": settings or {}, "results": [r.to_dict() for r in results]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
