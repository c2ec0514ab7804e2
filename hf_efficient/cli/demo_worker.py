"""One row of ``hf-efficient demo``, run in a fresh process so its peak memory is its own.

``python -m hf_efficient.cli.demo_worker SETTINGS.json OUT.json`` (the demo runs :func:`worker_command`): builds the row's model, measures it
and writes an :class:`~hf_efficient.evaluation.EvalResult` dict (plus timings, memory baseline and the
kernel census) to OUT.json. The parent (:mod:`hf_efficient.cli.demo`) prints and reports.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time


def run_row(settings: dict, log=print) -> dict:
    """Build and measure the row ``settings["row"]``; ``log`` receives one line per phase."""
    import os

    import psutil
    import torch
    from transformers import AutoTokenizer

    from .. import registry
    from ..data import token_ids
    from ..evaluation import KernelCensus, PeakMemory, evaluate
    from .demo_rows import BY_NAME

    registry.register_all()
    _return_freed_memory_promptly()
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    row, tag = BY_NAME[settings["row"]], settings.get("tag", settings["row"])
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        log(f"[{tag}] {name} ...")
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0
        log(f"[{tag}] {name} done in {timings[name]:.1f} s")

    tok = AutoTokenizer.from_pretrained(settings["base"])
    ids = token_ids(tok, "eval", settings["max_tokens"])
    baseline = psutil.Process(os.getpid()).memory_info().rss  # interpreter + torch + tokenizer, no model
    device = settings["device"]
    with PeakMemory(device) as mem, KernelCensus() as census:
        what = "load + quantize on load (RTN)" if row.recipe else "load"
        with phase(what):
            model = row.build(settings["base"], device=device, dtype=getattr(torch, settings["dtype"]))
        res = evaluate(model, tok, row.name, ids, context=settings["context"], stride=settings.get("stride"),
                       prompt_len=settings["prompt_len"], new_tokens=settings["new_tokens"],
                       repeats=settings["repeats"], progress=settings.get("progress", True), phase=phase)
    out = res.to_dict()
    out["peak_mem_mb"] = mem.peak_bytes / 2**20  # the whole row: load, quantization, evaluation
    out["extra"].update(timings_s=timings, baseline_rss_mb=baseline / 2**20,
                        row_mem_mb=max(0.0, (mem.peak_bytes - baseline) / 2**20) if device == "cpu" else None,
                        kernel=census.summary(), kernel_calls=census.counts, eval_tokens=int(ids.numel()))
    return out


def _return_freed_memory_promptly() -> None:
    """Serve blocks of 256 KiB and more from their own mappings, so freeing one returns it to the OS.

    glibc otherwise raises its mmap threshold (up to 32 MiB) after large frees and serves such blocks from the
    heap, where freed space stays in the process: in one row the 2048-token perplexity windows then left the
    RSS ~600 MiB above what the model and one window need, an allocator artefact that would be measured as the
    row's memory. A fixed threshold turns the dynamic adjustment off. This is a setting of this process (the
    demo's own worker); the library does not change allocator settings.
    """
    from ..heap import fix_mmap_threshold

    fix_mmap_threshold(256 * 1024)


# Packages that importing transformers' model code pulls in although no CPU row uses them: torch._dynamo imports
# triton when it is installed (transformers' fp8 integration imports dynamo), and transformers' object-detection
# losses import scipy. Neither is a dependency of hf-efficient on the CPU (both come with the `dev` extra that
# `make setup` installs), so a user's CPU install has neither; here they cost ~100 MiB of every row's baseline.
CPU_UNUSED_IMPORTS = ("triton", "scipy")


def worker_command(device: str) -> list[str]:
    """The command line (less its two file arguments) that runs :func:`main` in a fresh interpreter.

    On the CPU it first makes :data:`CPU_UNUSED_IMPORTS` unimportable (``sys.modules[name] = None``, the import
    system's marker for "absent"), as on an install without them; importers that treat them as optional (torch,
    transformers) go on without them. It must happen before ``hf_efficient`` is imported, whose ``__init__``
    registers with transformers. The GPU rows' kernels are Triton: there nothing is hidden.
    """
    hide = f"sys.modules.update(dict.fromkeys({CPU_UNUSED_IMPORTS!r})); " if device == "cpu" else ""
    code = f"import sys; {hide}from hf_efficient.cli.demo_worker import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code]


def main(argv: list[str]) -> int:
    settings = json.loads(open(argv[0]).read())
    out = run_row(settings, log=lambda line: print(line, flush=True))
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
