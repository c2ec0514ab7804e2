"""GPU memory of the user's path: ``from_pretrained(path, quantization_config=AFPQConfig(...), device_map="cuda")``.

Run: ``python -m benchmarks.quant_load_memory [--out DIR] [--layers 8]`` (CUDA). Writes a bf16 checkpoint of a
Llama-2-7B-shaped model with ``--layers`` blocks (random weights, safetensors, written once to ``--dir``),
then, for bf16 and each quantization config, loads it in a **fresh process** and records

* ``peak_load_GB``: ``torch.cuda.max_memory_allocated`` during ``from_pretrained``;
* ``after_load_GB`` / ``after_generate_GB``: allocated memory after loading and after a 16-token
  ``generate`` (the peak of the generate is ``peak_generate_GB``);
* ``packed_GB``: the model's own tensors as loaded (packed weights + scales + unquantized parameters);
* ``largest_bf16_GB``: the largest single float tensor of the checkpoint.

The issue's targets: after_load and after_generate <= 1.05 x packed (one resident copy of the weights, no side
buffers), and peak_load <= packed + largest_bf16 + 5 % (quantize-on-load streams tensor by tensor). The last
check loads the first quantized config again in a process whose CUDA allocator is capped
(``torch.cuda.set_per_process_memory_fraction``) at exactly that bound, which is below the bf16 model's size,
once with the default allocator and once with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (the setting the
docs give for such loads: the cap bounds *reserved* memory, which fixed segments fragment beyond the allocated
peak): ``loads_under_cap`` says whether ``from_pretrained`` succeeded there.
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import child_result, print_rows, run_child, write_results

CONFIGS = {
    "bf16": None,
    "int4_asym_g128": dict(bits=4, group_size=128, fmt="int"),
    "afpq_nf4_asym_g128": dict(bits=4, group_size=128, fmt="nf"),
    "afpq_fp4_asym_g128": dict(bits=4, group_size=128, fmt="fp"),
    "afpq_nf3_asym_g64": dict(bits=3, group_size=64, fmt="nf"),
}
GB = 1e9


def write_checkpoint(path: str, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init of ~2e9 parameters: seconds on the GPU, minutes on the CPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    torch.cuda.empty_cache()


def _out_of_memory(e: BaseException | None) -> torch.OutOfMemoryError | None:
    """The out-of-memory error behind ``e``: transformers reports one raised inside a weight conversion as a
    RuntimeError of its own, chained to it."""
    while e is not None and not isinstance(e, torch.OutOfMemoryError):
        e = e.__cause__ or e.__context__
    return e


def measure(path: str, name: str, cap_gb: float | None = None) -> dict:
    """Runs in the child process."""
    from transformers import AutoModelForCausalLM

    import hf_efficient  # noqa: F401
    from hf_efficient import AFPQConfig

    if cap_gb is not None:  # the context and the allocator's own state live outside the cap
        torch.cuda.init()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total)
        try:
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=AFPQConfig(**CONFIGS[name]))
        except RuntimeError as e:  # allocated vs reserved at the failure: live data or fragmentation
            oom = _out_of_memory(e)
            if oom is None:
                raise
            return dict(model=name, cap_GB=cap_gb, loads_under_cap=False, error=str(oom)[:120],
                        allocated_GB=torch.cuda.memory_allocated() / GB, reserved_GB=torch.cuda.memory_reserved() / GB,
                        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        return dict(model=name, cap_GB=cap_gb, loads_under_cap=True,
                    peak_load_GB=torch.cuda.max_memory_allocated() / GB,
                    peak_reserved_GB=torch.cuda.max_memory_reserved() / GB,
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    kw = CONFIGS[name]
    q = {"quantization_config": AFPQConfig(**kw)} if kw else {}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda", **q).eval()
    torch.cuda.synchronize()
    peak_load = torch.cuda.max_memory_allocated() - base
    after_load = torch.cuda.memory_allocated() - base
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    packed = sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
    ids = torch.randint(0, 32000, (1, 16), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=16, do_sample=False)
    torch.cuda.synchronize()
    kinds = sorted({m.layout.kind for m in model.modules() if getattr(m, "layout", None) is not None})
    return dict(model=name, peak_load_GB=peak_load / GB, after_load_GB=after_load / GB,
                after_generate_GB=(torch.cuda.memory_allocated() - base) / GB,
                peak_generate_GB=(torch.cuda.max_memory_allocated() - base) / GB, packed_GB=packed / GB,
                layouts=",".join(kinds) or "-")


def largest_tensor_bytes(path: str) -> int:
    from safetensors import safe_open

    best = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    best = max(best, n * 2)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dir", default="/tmp/hfe_llama7b_shaped")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_result(measure(args.dir, args.child, args.cap_gb))
        return
    if not torch.cuda.is_available():
        raise SystemExit("quant_load_memory needs CUDA")
    write_checkpoint(args.dir, args.layers)
    largest = largest_tensor_bytes(args.dir) / GB
    rows = []

    def child(name, *extra, env=None):
        return run_child("benchmarks.quant_load_memory", "--dir", args.dir, "--child", name, *extra, env=env)

    meta = {"model": f"Llama-2-7B-shaped, {args.layers} layers, bf16 checkpoint, random weights",
            "generate": "16 new tokens"}
    for name in args.configs.split(","):
        r = child(name)
        if r is None:
            continue
        r["largest_bf16_GB"] = largest
        r["after_load_x_packed"] = r["after_load_GB"] / r["packed_GB"]
        r["after_generate_x_packed"] = r["after_generate_GB"] / r["packed_GB"]
        r["peak_load_x_target"] = r["peak_load_GB"] / (1.05 * (r["packed_GB"] + largest))
        rows.append(r)
        print_rows(rows[-1:])
        write_results("quant_load_memory", rows, meta, args.out)
    quantized = [r for r in rows if CONFIGS[r["model"]]]
    if quantized:  # load again with the allocator capped at the target bound (below the bf16 model's size)
        r = quantized[0]
        cap = str(1.05 * (r["packed_GB"] + largest))
        for key, env in (("capped_load", None),
                         ("capped_load_expandable", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})):
            meta[key] = child(r["model"], "--cap-gb", cap, env=env)
            print(f"{key}:", meta[key], flush=True)
            write_results("quant_load_memory", rows, meta, args.out)


if __name__ == "__main__":
    main()
