"""End-to-end decode on the CPU: the embedded SmolLM2-135M with LUT W4/W2 vs fp32, and vs llama.cpp.

Ours: ``measure_speed`` (random 16-token prompt, 32 greedy one-token steps on its KV cache) for fp32 and for
``LUTConfig`` INT4 g128 / INT2 g64 (the decode matmuls run on ``csrc/lut_gemm.cpp``), each also with the tied
output head on the kernels (``enable_lut(model, head_bits=4, head_group_size=32)``, "+ head"): llama.cpp's files
quantize their output matrix too (Q4_0/Q6_K), so the "+ head" rows are the like-for-like comparison.

llama.cpp (optional, never a dependency): through ``llama-cpp-python`` in a separate interpreter, given by
``--llama-python`` or ``$LLAMA_CPP_PYTHON`` (default ``/tmp/llama-venv/bin/python``), or the current one when
it can import ``llama_cpp``. The environment is passed on, so a source checkout also works
(``PYTHONPATH=<llama-cpp-python>/`` and ``LLAMA_CPP_LIB_PATH=<folder with libllama.so>``). The embedded GGUF (Q4_1) is requantized by ``llama_model_quantize`` to F32, Q4_0,
Q2_K and TQ2_0; a random 16-token prompt is evaluated, then 32 single-token ``eval`` calls are timed (decode
only, no sampling loop in Python). llama.cpp keeps tensors whose rows are not a multiple of the 256-weight
super-block (most of this model: hidden size 576) in a fallback type; its quantize log says which. When no
interpreter with ``llama_cpp`` is found, the rows say so and the rest still runs.

Run: ``python -m benchmarks.lut_e2e [--threads 1 2] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import print_rows, write_results

PROMPT_LEN, NEW_TOKENS, REPEATS = 16, 32, 3
LLAMA_TYPES = ["F32", "Q4_0", "Q2_K", "TQ2_0"]
HEAD_BITS, HEAD_GROUP = 4, 32  # the "+ head" rows: INT4 g32 output head (llama.cpp uses Q6_K/Q4_0 for it)

# Runs inside the llama-cpp-python interpreter; prints one JSON line {type: {"tok_s": .., "bytes": ..}}.
_LLAMA_SCRIPT = r"""
import ctypes, json, os, random, statistics, sys, time
import llama_cpp
src, cache, threads, prompt_len, new_tokens, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
types = sys.argv[7].split(",")
ftypes = {"F32": "LLAMA_FTYPE_ALL_F32", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
          "TQ2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0"}
out = {"llama_cpp_version": llama_cpp.__version__}
for t in types:
    path = os.path.join(cache, f"smollm2-135m-{t}.gguf")
    if not os.path.exists(path):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, ftypes[t])
        p.allow_requantize = True
        p.nthread = threads
        if llama_cpp.llama_model_quantize(src.encode(), path.encode(), ctypes.byref(p)) != 0:
            out[t] = {"error": "quantize failed"}
            continue
    llm = llama_cpp.Llama(path, n_ctx=prompt_len + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=prompt_len, verbose=False)
    rng = random.Random(0)
    prompt = [rng.randrange(100, llm.n_vocab()) for _ in range(prompt_len)]
    times = []
    for _ in range(repeats + 1):  # the first round warms up
        llm.reset()
        llm.eval(prompt)
        tok = prompt[-1]
        t0 = time.perf_counter()
        for i in range(new_tokens):
            llm.eval([(tok + 7 * i) % llm.n_vocab()])
        times.append(time.perf_counter() - t0)
    out[t] = {"tok_s": new_tokens / statistics.median(times[1:]), "bytes": os.path.getsize(path)}
    del llm
print(json.dumps(out))
"""


def find_llama_python(explicit: str | None) -> str | None:
    cands = [explicit, os.environ.get("LLAMA_CPP_PYTHON"), "/tmp/llama-venv/bin/python", sys.executable]
    for c in cands:
        if c and (shutil.which(c) or Path(c).exists()):
            r = subprocess.run([c, "-c", "import llama_cpp"], capture_output=True)
            if r.returncode == 0:
                return c
    return None


def gguf_path() -> str:
    from hf_efficient.models import embedded_gguf_path

    return str(embedded_gguf_path())


def llama_rows(py: str | None, threads: int, cache: str):
    if py is None:
        return [{"name": f"llama.cpp {t}", "threads": threads, "note": "llama-cpp-python not found (optional)"}
                for t in LLAMA_TYPES], None
    os.makedirs(cache, exist_ok=True)
    r = subprocess.run([py, "-c", _LLAMA_SCRIPT, gguf_path(), cache, str(threads), str(PROMPT_LEN), str(NEW_TOKENS),
                        str(REPEATS), ",".join(LLAMA_TYPES)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp run failed:\n{r.stderr[-3000:]}")
        return [{"name": f"llama.cpp {t}", "threads": threads, "note": "llama.cpp run failed"}
                for t in LLAMA_TYPES], None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = []
    for t in LLAMA_TYPES:
        v = res[t]
        rows.append({"name": f"llama.cpp {t}", "threads": threads, "decode_tok_s": v.get("tok_s"),
                     "file_MB": v.get("bytes", 0) / 1e6, "note": v.get("error", "")})
    return rows, res["llama_cpp_version"]


def our_rows(threads: int):
    from hf_efficient.evaluation import measure_speed
    from hf_efficient.models import load_model
    from hf_efficient.quantization.lut import LUTConfig, enable_lut

    torch.set_num_threads(threads)
    rows = []
    for name, cfg in [("fp32", None), ("lut-int4-g128", LUTConfig(bits=4, group_size=128)),
                      ("lut-int2-g64", LUTConfig(bits=2, group_size=64))]:
        kw = {"quantization_config": cfg} if cfg is not None else {}
        model, _ = load_model(None, dtype=torch.float32, **kw)
        variants = [(name, False)] + ([(name + " + head", True)] if cfg is not None else [])
        for label, head in variants:
            if head:
                enable_lut(model, head_bits=HEAD_BITS, head_group_size=HEAD_GROUP)
            with torch.no_grad():
                s = measure_speed(model, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, repeats=REPEATS)
            rows.append({"name": f"ours {label}", "threads": threads, "decode_tok_s": s["decode_tok_s"]})
        del model
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--llama-python", default=None, help="interpreter with llama_cpp (default: autodetect)")
    ap.add_argument("--cache", default="/tmp/lut_e2e_gguf", help="folder for the requantized GGUF files")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    py = find_llama_python(args.llama_python)
    rows, version = [], None
    for threads in args.threads:
        ours = our_rows(threads)
        llama, version = llama_rows(py, threads, args.cache)
        fp32 = ours[0]["decode_tok_s"]
        by_name = {r["name"]: r.get("decode_tok_s") for r in llama}
        same_bits = {"ours lut-int4-g128": ["llama.cpp Q4_0"], "ours lut-int2-g64": ["llama.cpp TQ2_0", "llama.cpp Q2_K"],
                     "ours fp32": ["llama.cpp F32"]}
        for r in ours:
            r["speedup_vs_our_fp32"] = r["decode_tok_s"] / fp32
            ref = [(by_name[n], n) for n in same_bits[r["name"].removesuffix(" + head")] if by_name.get(n)]
            if ref:
                best, name = max(ref)
                r["llama_cpp_same_bits"] = name.split()[-1]
                r["llama_cpp_tok_s"] = best
                r["ours_over_llama_cpp"] = r["decode_tok_s"] / best
        print_rows(ours + llama)
        rows += ours + llama
    write_results("lut_cpu_e2e", rows,
                  {"model": "embedded SmolLM2-135M (GGUF Q4_1; ours dequantizes and requantizes on load)",
                   "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "repeats": REPEATS,
                   "llama_cpp_python": version or "not found",
                   "note": "ours: measure_speed (one-token forward steps on the prefill's KV cache); llama.cpp: "
                           "timed single-token eval calls. llama.cpp 2-bit types fall back to a wider type for "
                           "rows not a multiple of 256 (hidden size 576). '+ head': tied output head also on "
                           f"the LUT kernels (INT{HEAD_BITS} g{HEAD_GROUP} runtime copy)."},
                  args.out, columns=["name", "threads", "decode_tok_s", "speedup_vs_our_fp32", "llama_cpp_same_bits",
                                     "llama_cpp_tok_s", "ours_over_llama_cpp", "file_MB", "note"])


if __name__ == "__main__":
    main()
