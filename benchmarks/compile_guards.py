"""Host work that ``torch.compile`` adds to every call of a compiled decode step, by the kind of linear layer.

Run: ``python -m benchmarks.compile_guards [--layers 32] [--out DIR]`` (CPU or CUDA).

HF ``generate`` with a static cache calls a compiled forward once per token. Before the compiled graph runs,
dynamo checks its guards (one for each Python value and tensor the traced code read: on a module, its type,
the attributes its forward reads, each tensor's dtype, shape and strides), then passes every parameter and
buffer the graph reads as an input. That work grows with what each layer's forward reads. For a Llama-shaped
model with ``--layers`` blocks (tiny width: guards do not depend on sizes), compiled with ``fullgraph=True`` for
one token, each row records

* ``guard_us``: checking the compiled entry's guards once (dynamo's guard manager, a private API; best of
  several batches of calls);
* ``call_us``: one call of the compiled step whose backend hands back stored outputs, so what it measures is
  dynamo's own work per call (guards, gathering the graph's inputs, building the output), not the model's;
* ``call_skip_guards_us``: the same call under ``torch.compiler.set_stance("default",
  skip_guard_eval_unsafe=True)``, which checks only the guards dynamo keeps as "diff guards": every tensor that
  is not an ``nn.Parameter`` (a user's setting, unsafe if the model changes; transformers does not set it);
* ``graph_inputs``: the tensors passed to the graph per call (parameters and buffers it reads, and the input).

The baseline is the same model with ``nn.Linear`` layers, measured in the same run; ``*_ratio`` = ours / baseline
(> 1: more host work than ``nn.Linear``). Rows: QuantLinear in each CUDA layout (``cuda-tinygemm``: INT4-asym;
``cuda-triton``: AFPQ NF4-asym under ``force_kernel("gemv")``; ``cuda-mma``: AFPQ NF4-asym, where the extension
builds). On a CPU machine the CUDA fast path is routed for CPU tensors, as the CPU tests do: the guards come
from the traced Python, not from the device, and the ops run their reference bodies.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks.common import print_rows, write_results

# row name -> (format, force_kernel name); None = the nn.Linear baseline
ROWS = {
    "nn.Linear": None,
    "int4_asym (cuda-tinygemm)": ("int4_asym", "tinygemm"),
    "nf4_asym (cuda-triton)": ("nf4_asym", "gemv"),
    "nf4_asym (cuda-mma)": ("nf4_asym", "mma"),
}
GROUP = 128
BATCHES, CALLS, ROUNDS = 7, 200, 2  # best of BATCHES x CALLS calls, each row measured ROUNDS times, interleaved


def build(layers: int, device: str, row: tuple | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_efficient.quantization import QuantLinear
    from hf_efficient.quantization.gpu import force_kernel, repack_layer

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    if row is None:
        return model
    fmt, kernel = row
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q = QuantLinear.from_linear(child, fmt, GROUP)
                with force_kernel(kernel):
                    repack_layer(q, torch.bfloat16)
                setattr(parent, name, q)
    return model


def measure(model: nn.Module, device: str, batches: int = BATCHES, calls: int = CALLS) -> dict:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()

    inputs = []

    def stored_outputs(gm, example_inputs):
        inputs.append(len(example_inputs))
        out = gm(*example_inputs)
        return lambda *args: out

    def step(model, ids):
        return model(input_ids=ids, use_cache=False).logits

    compiled = torch.compile(step, backend=stored_outputs, fullgraph=True)
    ids = torch.ones(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        compiled(model, ids)
        entries = _debug_get_cache_entry_list(step.__code__)
        if len(entries) != 1:
            raise RuntimeError(f"expected one compiled entry, got {len(entries)} (a recompile?)")
        guards = entries[0].guard_manager
        frame = {"model": model, "ids": ids}
        if not guards.check(frame):
            raise RuntimeError("the guards reject the frame they were built for: dynamo's guard API changed?")

        def best_of(fn):
            per_call = []
            for _ in range(batches):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_call.append((time.perf_counter() - t0) / calls)
            return min(per_call)

        guard_s = best_of(lambda: guards.check(frame))
        call_s = best_of(lambda: compiled(model, ids))
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            compiled(model, ids)
            unsafe_s = best_of(lambda: compiled(model, ids))
    return {"graph_inputs": inputs[-1], "guard_us": guard_s * 1e6, "call_us": call_s * 1e6,
            "call_skip_guards_us": unsafe_s * 1e6}


def run(layers: int, device: str, rows=tuple(ROWS), rounds: int = ROUNDS) -> list[dict]:
    """Every row measured ``rounds`` times, interleaved (CPU timings drift); each keeps its best."""
    from hf_efficient.kernels import quant_mma
    from hf_efficient.quantization import register_fast_path, unregister_fast_path
    from hf_efficient.quantization.gpu import quant_linear_forward

    emulate = device == "cpu"
    if emulate:  # the CUDA fast path for CPU tensors, as tests/test_quant_kernels.py's fixture does
        register_fast_path("*", 4, "cpu", quant_linear_forward, name="bench-cuda-path")
    try:
        models = {}
        for name in rows:
            spec = ROWS[name]
            if spec is not None and spec[1] == "mma" and (emulate or quant_mma.extension() is None):
                why = "a CPU run" if emulate else "the mma extension did not build on this machine"
                print(f"{name}: skipped ({why}: the mma layout needs the CUDA extension)", flush=True)
                continue
            models[name] = build(layers, device, spec)
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for name, model in models.items():
                r = measure(model, device)
                old = best.setdefault(name, r)
                for k in ("guard_us", "call_us", "call_skip_guards_us"):
                    old[k] = min(old[k], r[k])
    finally:
        if emulate:
            unregister_fast_path("*", 4, "cpu", "bench-cuda-path")
    out = [{"name": name, "layers": layers, **r} for name, r in best.items()]
    base = best.get("nn.Linear")
    if base is not None:
        for r in out:
            r["guard_ratio"] = r["guard_us"] / base["guard_us"]
            r["call_ratio"] = r["call_us"] / base["call_us"]
            r["skip_guards_ratio"] = r["call_skip_guards_us"] / base["call_skip_guards_us"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None, help="results file name (default compile_guards_<device>)")
    args = ap.parse_args(argv)
    rows = run(args.layers, args.device)
    print_rows(rows)
    name = args.name or f"compile_guards_{args.device}"
    write_results(name, rows, {"layers": args.layers, "device": args.device, "group_size": GROUP,
                               "timing": f"best of {BATCHES} batches of {CALLS} calls, {ROUNDS} interleaved rounds"}, args.out,
                  columns=["name", "graph_inputs", "guard_us", "guard_ratio", "call_us",
                           "call_ratio", "call_skip_guards_us", "skip_guards_ratio"])


if __name__ == "__main__":
    main()
