"""End-to-end decode on the CPU through ``model.generate``: the embedded SmolLM2-135M with LUT W4/W2 vs fp32, and
vs llama.cpp timed in the same run, with each row's perplexity on the same held-out text.

Ours: fp32 and ``LUTConfig`` INT4 g128 / INT2 g64 (the decode matmuls run on the C++ LUT engines), each quantized
model also with the tied output head on the kernels (``enable_lut(model, head_bits=4, head_group_size=32)``, "+
head"): llama.cpp's files quantize their output matrix too (Q4_0/Q6_K), so the "+ head" rows are the like-for-like
comparison in bytes. "lut-int4-g32 + head8" is the one in quality: INT4 g32 layers and an INT8 g32 head
(``head_bits=8``), as Q4_0 (g32) with its Q8_0 output matrix; "lut-nf4-g32 + head8" the same with AFPQ's two-scale
NF4 grid. ``decode_tok_s`` is greedy ``model.generate`` on a random 16-token prompt: a logits processor stamps the
time of every generated token, and the rate is (tokens - 1) / (last stamp - first stamp), so prefill is excluded and
every counted interval is one whole generate step (forward, cache, argmax, stopping checks). Since 2026-12-03 (#21)
generate runs with ``eos_token_id=None`` instead of ``min_new_tokens``: it cannot stop early either way (the step
count is checked), but ``min_new_tokens`` added two logits processors and EOS stopping that llama.cpp's loop does
not have (their cost: docs/lut.md); earlier tables were timed with them. ``forward_loop_tok_s`` is
``measure_speed``'s bare loop of one-token forwards (what earlier tables reported), so the gap between the two is
``generate``'s own overhead.

llama.cpp (optional, never a dependency): ``llama-cpp-python`` in a separate interpreter, given by
``--llama-python`` or ``$LLAMA_CPP_PYTHON`` (default ``/tmp/llama-venv/bin/python``, which
``scripts/build_llama_cpp.sh`` makes), or the current one when it can import ``llama_cpp``. The environment is
passed on, so ``PYTHONPATH=<llama-cpp-python source>`` + ``LLAMA_CPP_LIB_PATH=<folder with libllama.so>`` also
works. A child process requantizes the embedded GGUF (Q4_1) with ``llama_model_quantize`` to F32, Q4_0, Q2_K and
TQ2_0 and keeps the models loaded; its decode loop is the same greedy loop (argmax of the last logits, then a
one-token ``llama_decode``), timed per token like ours. llama.cpp keeps tensors whose rows are not a multiple of
the 256-weight super-block (most of this model: hidden size 576) in a fallback type; ``llama_weight_types`` gives
each file's share of weights per type.

Same run, interleaved: for each thread count, ``--rounds`` rounds each time every one of our models and then every
llama.cpp model; each figure is the best round's median over ``--repeats`` (the least disturbed round, the same
rule for both sides), and each row records the 1-minute load average at the time. Perplexity: both sides score
the same ``--ppl-tokens`` token ids of the held-out plays (our tokenizer's ids are fed to llama.cpp directly; the
GGUF has the same vocabulary) in one window, every token after the first scored once.

Rows ending in "fused" run the decoder layers on the fused C++ decode step
(:func:`hf_efficient.quantization.lut.enable_fast_decode`); fp32 and the INT4 rows also run without it.

Run: ``python -m benchmarks.lut_e2e [--threads 1 2] [--rounds 3] [--new-tokens 32] [--out DIR] [--name KIND]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import print_rows, write_results

PROMPT_LEN, NEW_TOKENS, REPEATS, ROUNDS, PPL_TOKENS = 16, 32, 3, 3, 1024
LLAMA_TYPES = ["F32", "Q4_0", "Q2_K", "TQ2_0"]
HEAD_GROUP = 32  # the output head's copy on the LUT kernels: "+ head" INT4 g32, "+ head8" INT8 g32
# Our models and their rows: {name suffix: head bits on the LUT kernels, None for the float head}. The g32 body
# with an INT8 head is the row of llama.cpp Q4_0's quality (Q4_0 keeps its output matrix in Q8_0).
# "lut-nf4-g32": AFPQ's two-scale NF4 (LUTConfig fmt="nf", asymmetric) on the code-indexed engine.
MODELS = [("fp32", None, {"": None}), ("lut-int4-g128", dict(bits=4, group_size=128), {"": None, " + head": 4}),
          ("lut-int2-g64", dict(bits=2, group_size=64), {"": None, " + head": 4}),
          ("lut-int4-g32", dict(bits=4, group_size=32), {" + head8": 8}),
          ("lut-nf4-g32", dict(bits=4, group_size=32, fmt="nf"), {" + head8": 8})]
# Our rows and the llama.cpp types at the same bits (2-bit rows compare with the faster of TQ2_0 and Q2_K).
SAME_BITS = {"fp32": ["F32"], "lut-int4-g128": ["Q4_0"], "lut-int2-g64": ["TQ2_0", "Q2_K"], "lut-int4-g32": ["Q4_0"],
             "lut-nf4-g32": ["Q4_0"]}
# Every row runs with the fused decode step (enable_fast_decode; name suffix FUSED); these also run without it, so
# the same run gives the step's before/after.
FUSED = " fused"
UNFUSED = ("fp32", "lut-int4-g128", "lut-int4-g128 + head")

# Child process: keeps the llama.cpp models loaded and answers one JSON line per JSON request line.
_LLAMA_SERVER = r"""
import ctypes, json, math, os, random, statistics, sys, time
import numpy as np
import llama_cpp
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
          "TQ2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0"}
models = {}
def load(req):
    path = os.path.join(req["cache"], f"smollm2-135m-{req['type']}.gguf")
    if not os.path.exists(path):
        os.makedirs(req["cache"], exist_ok=True)
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, FTYPES[req["type"]])
        p.allow_requantize = True
        p.nthread = 2
        if llama_cpp.llama_model_quantize(req["src"].encode(), path.encode(), ctypes.byref(p)) != 0:
            return {"error": "quantize failed"}
    models[req["type"]] = llama_cpp.Llama(path, n_ctx=req["n_ctx"], n_batch=req["n_ctx"], n_threads=1,
                                          n_threads_batch=1, verbose=False)
    return {"path": path, "bytes": os.path.getsize(path)}
def decode(req):
    llm = models[req["type"]]
    llm._ctx.set_n_threads(req["threads"], req["threads"])
    n_vocab = llm.n_vocab()
    rng = random.Random(0)
    prompt = [rng.randrange(100, n_vocab) for _ in range(req["prompt_len"])]
    times = []
    for r in range(req["repeats"] + 1):  # the first round warms up
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(req["new_tokens"]):  # greedy: argmax of the last logits, then one token through the model
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        times.append(time.perf_counter() - t0)
    return {"tok_s": req["new_tokens"] / statistics.median(times[1:])}
def ppl(req):
    ids = req["ids"]
    n = len(ids)
    llm = llama_cpp.Llama(models[req["type"]].model_path, n_ctx=n, n_batch=n, n_ubatch=min(n, 512),
                          logits_all=True, n_threads=req["threads"], n_threads_batch=req["threads"], verbose=False)
    llm.eval(ids)
    nll = 0.0
    for a in range(0, n - 1, 128):  # log-softmax in row chunks: the full logits are n x vocab floats
        z = llm.scores[a:min(a + 128, n - 1)].astype(np.float64)
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
        tgt = np.asarray(ids[a + 1:a + 1 + len(z)])
        nll += float((lse - z[np.arange(len(z)), tgt]).sum())
    del llm
    return {"ppl": math.exp(nll / (n - 1)), "scored": n - 1}
print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        out = {"load": load, "decode": decode, "ppl": ppl}[req["op"]](req)
    except Exception as e:  # report and keep serving: one failing type must not end the run
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
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


class LlamaServer:
    """The llama.cpp child process (see ``_LLAMA_SERVER``): ``request(op=..., ...)`` returns its JSON answer."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, "-c", _LLAMA_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        hello = json.loads(self.proc.stdout.readline() or "null") or {}
        if "version" not in hello:
            raise RuntimeError("the llama.cpp child process did not start")
        self.version, self.system_info = hello["version"], hello["system_info"]

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp child process died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def weight_types(path: str) -> str:
    """Share of a GGUF file's 2-D weights (by element count) per storage type, largest first."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


class _Stamps:
    """A ``generate`` logits processor that records when each step's logits arrive and leaves them unchanged."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate_decode_tok_s(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy ``model.generate`` decode rate (median over ``repeats``), prefill excluded (module docstring)."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decode steps, got {new_tokens}")
    rates = []
    for _ in range(repeats):
        stamps = _Stamps()
        # eos_token_id=None: no EOS stop, so every run makes new_tokens steps (checked below) without the two
        # min-length logits processors that min_new_tokens adds (llama.cpp's loop has none; cost in docs/lut.md)
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, eos_token_id=None,
                       do_sample=False, logits_processor=LogitsProcessorList([stamps]),
                       pad_token_id=model.config.eos_token_id)
        if len(stamps.times) != new_tokens:
            raise RuntimeError(f"generate made {len(stamps.times)} steps, expected {new_tokens}")
        rates.append((new_tokens - 1) / (stamps.times[-1] - stamps.times[0]))
    return statistics.median(rates)


def load_ours(kv_cache: str = "float32") -> tuple[dict, object]:
    """({row name: model}, tokenizer) for the MODELS rows (head variants are deep copies, so that every variant stays
    loaded for the interleaved rounds); the fused rows attend over ``kv_cache`` keys and values
    (``enable_fast_decode``'s option)."""
    from hf_efficient.models import load_model
    from hf_efficient.quantization.lut import LUTConfig, enable_lut

    from hf_efficient.quantization.lut import enable_fast_decode

    models = {}
    for name, spec, heads in MODELS:
        kw = {"quantization_config": LUTConfig(**spec)} if spec is not None else {}
        model, tok = load_model(None, dtype=torch.float32, **kw)
        variants = {}
        for suffix, head_bits in heads.items():
            # the float-head variant is the loaded model itself (it is only copied below)
            variants[name + suffix] = m = model if head_bits is None else copy.deepcopy(model)
            if head_bits is not None:
                enable_lut(m, head_bits=head_bits, head_group_size=HEAD_GROUP)
        for vname, m in variants.items():
            # each row with the fused decode step (FUSED); the rows of UNFUSED also without it
            if vname in UNFUSED:
                models[vname] = copy.deepcopy(m)
                enable_fast_decode(models[vname], False)
            fused = copy.deepcopy(m)
            if not enable_fast_decode(fused, kv_cache=kv_cache):
                raise RuntimeError(f"{vname}: the fused decode step did not switch on")
            models[vname + FUSED] = fused
        del variants, model
    return models, tok


def base_row(name: str) -> str:
    """The SAME_BITS key of a row name ("ours lut-int4-g128 + head fused" -> "lut-int4-g128")."""
    return name.removeprefix("ours ").removesuffix(FUSED).removesuffix(" + head8").removesuffix(" + head")


def engine_of(model, prompt: torch.Tensor) -> str:
    """What served a short generate: the fused decode step's layer steps and float-head GEMVs (counted), the
    implementation of the quantized linears outside it (prefill; a quantized head) and the LUT engine's ISA."""
    from hf_efficient.evaluation import KernelCensus
    from hf_efficient.kernels import lut_cpu as K
    from hf_efficient.quantization.lut import decode

    fused = {"layer": 0, "head": 0}
    run_layer, run_layers, linear_op = decode._run_layer, decode._run_layers, decode._linear_op

    def counted_layer(*a, **k):
        fused["layer"] += 1
        return run_layer(*a, **k)

    def counted_layers(stack, *a, **k):  # all layers in one decode_layers call
        fused["layer"] += stack.n
        return run_layers(stack, *a, **k)

    def counted_linear_op():  # the float head's GEMV (the LM step runs other heads, e.g. a LUTHead, by their call)
        op = linear_op()

        def call(*a, **k):
            fused["head"] += 1
            return op(*a, **k)

        return call

    decode._run_layer, decode._run_layers, decode._linear_op = counted_layer, counted_layers, counted_linear_op
    try:
        with KernelCensus() as census, torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
                           pad_token_id=model.config.eos_token_id)
    finally:
        decode._run_layer, decode._run_layers, decode._linear_op = run_layer, run_layers, linear_op
    isa = K.isa() if K.available() else "no C++ extension"
    parts = []
    if fused["layer"]:
        parts.append(f"fused decode step ({fused['layer']} layer steps"
                     + (f", float head on decode_linear x{fused['head']})" if fused["head"] else ")"))
    parts.append(("other linears: " if fused["layer"] else "") + census.summary().replace(
        "float (torch matmul)", "float (torch matmul, prefill)" if fused["layer"] else "float (torch matmul)"))
    return "; ".join(parts) + ("" if not census.counts else f" · LUT engine {isa}")


def load_avg() -> float:
    return os.getloadavg()[0]


def run(threads_list, rounds, repeats, ppl_tokens, llama: LlamaServer | None, cache: str, save,
        new_tokens: int = NEW_TOKENS, kv_cache: str = "float32"):
    """Measure everything (module docstring); ``save(rows, progress)`` is called after every round."""
    from benchmarks.cpu_threads import cpu_info
    from hf_efficient.data import heldout_ids
    from hf_efficient.evaluation import measure_speed, perplexity

    info = cpu_info()
    print(info, flush=True)
    models, tok = load_ours(kv_cache)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, models["fp32"].config.vocab_size, (1, PROMPT_LEN), generator=g)
    ids = heldout_ids(tok, "plays", ppl_tokens)
    engines = {name: engine_of(m, prompt) for name, m in models.items()}
    llama_info: dict[str, dict] = {}
    if llama:
        for t in LLAMA_TYPES:
            r = llama.request(op="load", type=t, src=gguf_path(), cache=cache, n_ctx=PROMPT_LEN + new_tokens + 8)
            if "error" not in r:
                r["weight_types"] = weight_types(r["path"])
            llama_info[t] = r
            print(f"llama.cpp {t}: {r}", flush=True)

    # Perplexity does not depend on the thread count: scored once, with the most threads.
    ppl_threads = max(threads_list)
    torch.set_num_threads(ppl_threads)
    ppl = {}
    for name, m in models.items():
        ppl[f"ours {name}"] = perplexity(m, ids, context=ids.numel(), progress=False)
        print(f"ours {name}: PPL {ppl[f'ours {name}']:.3f}", flush=True)
    for t, li in llama_info.items():
        if "error" not in li:
            r = llama.request(op="ppl", type=t, threads=ppl_threads, ids=ids.tolist())
            ppl[f"llama.cpp {t}"] = r.get("ppl")
            print(f"llama.cpp {t}: {r}", flush=True)

    def rows_of(threads, best):
        """The table rows of one thread count from the best rounds so far."""
        ours = [{"name": f"ours {n}", "threads": threads, **best[f"ours {n}"], "ppl": ppl[f"ours {n}"],
                 "engine": engines[n]} for n in models]
        theirs = []
        for t in LLAMA_TYPES:
            li = llama_info.get(t, {})
            theirs.append({"name": f"llama.cpp {t}", "threads": threads, **best.get(f"llama.cpp {t}", {}),
                           "ppl": ppl.get(f"llama.cpp {t}"),
                           "engine": "llama.cpp ggml-cpu (built natively)" if llama else "",
                           "file_MB": li.get("bytes", 0) / 1e6 or None,
                           "llama_weight_types": li.get("weight_types", ""),
                           "note": li.get("error", "") if llama else "llama-cpp-python not found (optional)"})
        fp32 = best["ours fp32"]["decode_tok_s"]  # the plain fp32 model (no fused step)
        by_type = {r["name"].split()[-1]: r.get("decode_tok_s") for r in theirs}
        for r in ours:
            r["speedup_vs_our_fp32"] = r["decode_tok_s"] / fp32
            refs = [(by_type[t], t) for t in SAME_BITS[base_row(r["name"])]
                    if by_type.get(t)]
            if refs:
                tok_s, t = max(refs)
                r.update(llama_cpp_same_bits=t, llama_cpp_tok_s=tok_s, ours_over_llama_cpp=r["decode_tok_s"] / tok_s,
                         llama_cpp_ppl=ppl.get(f"llama.cpp {t}"))
        for r in ours + theirs:
            r.update(cpu=info["cpu"], caches=info["caches"], simd=info["simd"])
        return ours + theirs

    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for m in models.values():  # warm-up at this thread count: the first generate of a model is slow
            generate_decode_tok_s(m, prompt, 4, 1)
        best: dict[str, dict] = {}
        for rnd in range(rounds):
            def keep(name, **v):
                if name not in best or v["decode_tok_s"] > best[name]["decode_tok_s"]:
                    best[name] = {**v, "load_avg_1min": load_avg(), "round": rnd}
            with torch.no_grad():
                for name, m in models.items():
                    gen = generate_decode_tok_s(m, prompt, new_tokens, repeats)
                    loop = measure_speed(m, prompt_len=PROMPT_LEN, new_tokens=new_tokens, repeats=repeats)
                    keep(f"ours {name}", decode_tok_s=gen, forward_loop_tok_s=loop["decode_tok_s"])
            for t, li in llama_info.items():
                if "error" not in li:
                    r = llama.request(op="decode", type=t, threads=threads, prompt_len=PROMPT_LEN,
                                      new_tokens=new_tokens, repeats=repeats)
                    if "tok_s" in r:
                        keep(f"llama.cpp {t}", decode_tok_s=r["tok_s"])
            print(f"threads={threads} round {rnd}: " + ", ".join(f"{k} {v['decode_tok_s']:.1f}"
                                                                 for k, v in best.items()), flush=True)
            # Written after every round, so a run cut short (a busy shared machine) still leaves its table.
            save(rows + rows_of(threads, best), {"threads": threads, "rounds_done": rnd + 1})
        block = rows_of(threads, best)
        print_rows(block)
        rows += block
    return rows, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds (best round kept)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="timed repeats per round (median)")
    ap.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS, help="held-out tokens scored for perplexity")
    ap.add_argument("--llama-python", default=None, help="interpreter with llama_cpp (default: autodetect)")
    ap.add_argument("--cache", default="/tmp/lut_e2e_gguf", help="folder for the requantized GGUF files")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="machine kind: results go to lut_cpu_e2e_<name>.{json,md}")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS,
                    help=f"decoded tokens per timed run (default {NEW_TOKENS}; longer runs show the cost per cached "
                         "position)")
    ap.add_argument("--kv-cache", choices=["float32", "float16"], default="float32",
                    help="what the fused rows' attention reads (enable_fast_decode's kv_cache; llama.cpp's cache is "
                         "float16 by default)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.ppl_tokens < 2 or args.new_tokens < 2:
        raise SystemExit("--rounds and --repeats must be >= 1, --ppl-tokens and --new-tokens >= 2")
    py = find_llama_python(args.llama_python)
    llama = LlamaServer(py) if py else None
    if llama is None:
        print("llama-cpp-python not found: llama.cpp rows stay empty (scripts/build_llama_cpp.sh builds it)")

    def save(rows, progress):
        write_results("lut_cpu_e2e" + (f"_{args.name}" if args.name else ""), rows,
                      {"model": "embedded SmolLM2-135M (GGUF Q4_1; ours dequantizes and requantizes on load)",
                       "prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "fused_kv_cache": args.kv_cache,
                       "rounds": args.rounds, "progress": progress, "threads": args.threads,
                       "ppl": f"{args.ppl_tokens} held-out tokens (plays), one window",
                       "llama_cpp_python": llama.version if llama else "not found",
                       "llama_cpp_system_info": llama.system_info if llama else None,
                       "note": "decode through model.generate (greedy, per-token stamps) vs llama.cpp's greedy "
                               "argmax + one-token decode loop, interleaved; best round of each. '+ head' / '+ head8': "
                               f"tied output head also on the LUT kernels (INT4 / INT8 g{HEAD_GROUP} runtime copy). "
                               "'fused': the fused C++ decode step (enable_fast_decode: decoder layers, stack, float head); "
                               "generate with eos_token_id=None (no min_new_tokens logits processors); "
                               "speedup_vs_our_fp32 is against the plain fp32 row."},
                      args.out, columns=["name", "threads", "decode_tok_s", "forward_loop_tok_s",
                                         "speedup_vs_our_fp32", "llama_cpp_same_bits", "llama_cpp_tok_s",
                                         "ours_over_llama_cpp", "ppl", "llama_cpp_ppl", "file_MB",
                                         "llama_weight_types", "engine", "load_avg_1min", "note"])

    try:
        rows, _ = run(args.threads, args.rounds, args.repeats, args.ppl_tokens, llama, args.cache, save,
                      args.new_tokens, args.kv_cache)
    finally:
        if llama:
            llama.close()
    save(rows, "complete")


if __name__ == "__main__":
    main()
