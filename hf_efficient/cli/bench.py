"""``hf-efficient bench``: prefill/decode tokens/s, peak memory and weight size of one model."""
from __future__ import annotations

from .common import add_model_args, add_speed_args, check_writable_file, report, setup_runtime, torch_dtype

HELP = "prefill/decode tokens/s, peak memory and size"


def configure(p) -> None:
    add_model_args(p)
    add_speed_args(p)


def run(args) -> int:
    check_writable_file(args.json)
    device = setup_runtime(args)
    from ..evaluation import EvalResult, PeakMemory, measure_speed, state_dict_bytes
    from ..models import load_model

    model, _ = load_model(args.model, dtype=torch_dtype(args.dtype), device=device)
    with PeakMemory(device) as mem:
        speed = measure_speed(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                              repeats=args.repeats)
    res = EvalResult(name=args.model or "embedded", peak_mem_mb=mem.peak_bytes / 2**20,
                     size_mb=state_dict_bytes(model) / 2**20, **speed)
    report([res], args, vars(args) | {"_run": None})
    return 0
