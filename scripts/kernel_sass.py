"""Compile a quantized-matmul kernel for a GPU target on a machine WITHOUT a GPU and count its SASS.

Triton's wheel ships ptxas and nvdisasm, so the exact machine code of a config can be inspected anywhere: the
instructions of the main loop, how many weights one thread handles per iteration, and the width of every global
load. It measures no time; it tells whether a change removed instructions or vectorized a load before any GPU
time is spent on it.

    python scripts/kernel_sass.py                       # gemv, int4_asym, every config of the space
    python scripts/kernel_sass.py --fmt nf4_asym --kernel gemm --unspecialized K   # K as if do_not_specialize
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_efficient import formats
from hf_efficient.kernels import quant_gemm
from hf_efficient.kernels.autotune import space, valid
from hf_efficient.kernels.quant_layout import choose_decode

POINTERS = {"x_ptr": "*bf16", "q_ptr": "*i32", "p_ptr": "*bf16", "t_ptr": "*fp32", "out_ptr": "*bf16",
            "ws_ptr": "*fp32", "cnt_ptr": "*i32"}


def sass(kernel: str, fmt_name: str, cfg: dict, m: int, divisible: set[str], arch: int) -> tuple[str, str]:
    """(SASS text, PTX text) of ``kernel`` for ``fmt_name`` and ``cfg``; ``divisible``: integer arguments
    compiled as multiples of 16 (what Triton's specialisation would tell the compiler)."""
    fn = {"gemv": quant_gemm._gemv_kernel, "gemm": quant_gemm._gemm_kernel}[kernel].fn
    fmt = formats.get_format(fmt_name)
    const = {"BITS": fmt.bits, "MODE": fmt.scale_scheme.mode, "DECODE": choose_decode(fmt.grid)[0],
             **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}}
    if kernel == "gemv":
        const["BLOCK_M"] = triton.next_power_of_2(m)
    names = fn.arg_names
    sig = {n: POINTERS.get(n, "constexpr" if n in const else "fp32" if n == "v_off" else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in [*POINTERS, *divisible]}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    cubin = Path("/tmp/hfe_kernel.cubin")
    cubin.write_bytes(k.asm["cubin"])
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    return subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout, \
        k.asm["ptx"]


def loop_stats(text: str) -> tuple[int, collections.Counter]:
    """Instructions between the loop label and its backward branch (the longest such span), by opcode."""
    lines = text.splitlines()
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `?\(?(\.L_x_\d+)", line)
        if not m:
            continue
        start = next((j for j in range(i) if lines[j].startswith(m.group(1) + ":")), None)
        if start is not None and i - start > len(best):
            best = lines[start:i + 1]
    ops = collections.Counter()
    for line in best:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return sum(ops.values()), ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="gemv", choices=["gemv", "gemm"])
    ap.add_argument("--fmt", default="int4_asym")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper)")
    ap.add_argument("--unspecialized", default="", help="comma-separated integer args compiled without "
                    "divisibility info (default: those in quant_gemm.SHAPE_ARGS)")
    args = ap.parse_args()
    ints = {"M", "N", "K", "KW", "P0W", "NG", "NC", "CPG", "GROUP", "M_BUCKET"}
    plain = set(args.unspecialized.split(",")) - {""} if args.unspecialized else set(quant_gemm.SHAPE_ARGS)
    bits = formats.get_format(args.fmt).bits
    call = {"GROUP": 128, "BITS": bits, "M": args.m, "BLOCK_M": triton.next_power_of_2(args.m)}
    for cfg in space(args.kernel):
        if not valid(args.kernel, cfg, call):
            continue
        code, ptx = sass(args.kernel, args.fmt, cfg, args.m, ints - plain, args.arch)
        n, ops = loop_stats(code)
        # weights one thread decodes per loop iteration (the GEMM decodes a tile once for all its rows)
        per_thread = cfg["BLOCK_N"] * cfg["BLOCK_C"] * 32 / (32 * cfg["num_warps"])
        loads = collections.Counter(re.findall(r"ld\.global[.a-z0-9]*", ptx))
        print(f"{cfg}: loop {n} instructions = {n / per_thread:.2f} per weight; {dict(ops.most_common(6))}; "
              f"loads {dict(loads)}", flush=True)


if __name__ == "__main__":
    main()
