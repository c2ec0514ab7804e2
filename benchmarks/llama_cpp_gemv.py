"""llama.cpp (ggml) GEMV timings in the same run as ours, through ``llama-cpp-python``'s bundled ggml libraries.

Optional: ``llama-cpp-python`` lives in another interpreter (``benchmarks.lut_e2e.find_llama_python``); a
child process loads ``libggml-base``/``libggml-cpu`` with ctypes, quantizes random N x K weights with
``ggml_quantize_chunk`` and times ``ggml_mul_mat`` against one float32 activation row, the path llama.cpp's
CPU backend runs for decode (activations quantized to Q8 inside the op). Each graph holds ``nw`` distinct weight
copies of one quantized matrix (at least ``nw``, and enough to fill ``fill_bytes``, e.g. twice the last-level cache) so that every GEMV
streams its weights from DRAM, as in a decode step; the time is per GEMV, and includes ggml's per-graph thread
start (amortized over the ``nw`` GEMVs).
"""
from __future__ import annotations

import json
import subprocess

# Child: reads "K N threads nw fill_bytes repeats TYPE" lines, answers one JSON line per request.
_SERVER = r"""
import ctypes, glob, json, os, sys, time, statistics
import numpy as np
if len(sys.argv) > 1:  # a llama.cpp build folder (bin/ with libggml-*.so), e.g. llama-cpp-python's cmake tree
    lib_dir, version = sys.argv[1], "ggml libraries in " + sys.argv[1]
else:
    import llama_cpp
    lib_dir, version = os.path.join(os.path.dirname(llama_cpp.__file__), "lib"), "llama-cpp-python " + llama_cpp.__version__
def load(name):
    return ctypes.CDLL(sorted(glob.glob(os.path.join(lib_dir, f"lib{name}.so*")))[0], mode=ctypes.RTLD_GLOBAL)
base, cpu = load("ggml-base"), load("ggml-cpu")
class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]
P, I64 = ctypes.c_void_p, ctypes.c_int64
for f, res, args in [("ggml_init", P, [InitParams]), ("ggml_new_tensor_2d", P, [P, ctypes.c_int, I64, I64]),
                     ("ggml_mul_mat", P, [P, P, P]), ("ggml_new_graph", P, [P]),
                     ("ggml_build_forward_expand", None, [P, P]), ("ggml_get_data", P, [P]),
                     ("ggml_row_size", ctypes.c_size_t, [ctypes.c_int, I64]),
                     ("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, P, P, I64, I64, I64, P]),
                     ("ggml_free", None, [P])]:
    getattr(base, f).restype, getattr(base, f).argtypes = res, args
cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
cpu.ggml_graph_compute_with_ctx.argtypes = [P, P, ctypes.c_int]
cpu.ggml_cpu_init()
# What this ggml-cpu was compiled for (GGML_NATIVE builds for the machine it was built on).
FEATURES = ["avx2", "fma", "f16c", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_int8", "neon"]
has = {f: getattr(cpu, f"ggml_cpu_has_{f}", None) for f in FEATURES}  # None: symbol absent in this version
isa = [f.upper() for f, fn in has.items() if fn is not None and fn()]
TYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 8, "Q2_K": 10, "Q4_K": 12, "TQ1_0": 34, "TQ2_0": 35}
qweights = {}
def quantized(K, N, t):
    # Quantized bytes are cached across requests of the same shape; each request builds a fresh context, because
    # ggml_graph_compute_with_ctx allocates its work buffer from the context on every call.
    key = (K, N, t)
    if key not in qweights:
        for old in [k for k in qweights if k[:2] != (K, N)]:
            del qweights[old]
        ty = TYPES[t]
        wbytes = base.ggml_row_size(ty, K) * N
        w = np.random.default_rng(0).standard_normal((N, K), dtype=np.float32)
        q = np.empty(wbytes, dtype=np.uint8)
        if ty == 0:
            q[:] = w.view(np.uint8).reshape(-1)
        else:
            base.ggml_quantize_chunk(ty, w.ctypes.data, q.ctypes.data, 0, N, K, None)
        qweights[key] = (ty, wbytes, q)
    return qweights[key]
print(json.dumps({"version": version, "isa": " ".join(isa)}), flush=True)
for line in sys.stdin:
    K, N, threads, nw, fill, repeats, t = line.split()
    K, N, threads, nw, fill, repeats = map(int, (K, N, threads, nw, fill, repeats))
    ty, wbytes, q = quantized(K, N, t)
    nw = max(nw, -(-fill // wbytes))
    ctx = base.ggml_init(InitParams(nw * (wbytes + 4096) + (256 << 20), None, False))
    xs = base.ggml_new_tensor_2d(ctx, 0, K, 1)
    x = np.random.default_rng(1).standard_normal(K, dtype=np.float32)
    ctypes.memmove(base.ggml_get_data(xs), x.ctypes.data, 4 * K)
    gf = base.ggml_new_graph(ctx)
    for _ in range(nw):
        a = base.ggml_new_tensor_2d(ctx, ty, K, N)
        ctypes.memmove(base.ggml_get_data(a), q.ctypes.data, wbytes)
        base.ggml_build_forward_expand(gf, base.ggml_mul_mat(ctx, a, xs))
    for _ in range(2):
        cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cpu.ggml_graph_compute_with_ctx(ctx, gf, threads)
        ts.append((time.perf_counter() - t0) / nw)
    base.ggml_free(ctx)
    print(json.dumps({"us": statistics.median(ts) * 1e6, "bytes": wbytes, "copies": nw}), flush=True)
"""


class LlamaGemv:
    """A child process timing ggml GEMVs on request (see the module docstring)."""

    def __init__(self, python: str, lib_dir: str | None = None):
        """``python``: an interpreter with numpy and (unless ``lib_dir`` names ggml's libraries) ``llama_cpp``."""
        self.proc = subprocess.Popen([python, "-c", _SERVER] + ([lib_dir] if lib_dir else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        self.version, self.isa = hello["version"], hello["isa"]

    def time_us(self, k: int, n: int, threads: int, qtype: str, nw: int = 4, fill_bytes: int = 0,
                repeats: int = 10) -> tuple[float, int]:
        """Median microseconds per GEMV of an n x k ``qtype`` matrix, and the matrix's bytes. The timing rotates
        over at least ``nw`` weight copies, and over enough of them to span ``fill_bytes``."""
        self.proc.stdin.write(f"{k} {n} {threads} {nw} {fill_bytes} {repeats} {qtype}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp GEMV child process died")
        r = json.loads(line)
        return r["us"], r["bytes"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
