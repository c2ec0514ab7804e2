"""Dequant-fused Triton kernels for low-bit weights: GEMV (M <= 8, CUDA cores) and GEMM (M > 8, tensor cores).

Weights are in the kernel layout of :mod:`hf_efficient.kernels.quant_layout` (K contiguous per output row,
32-code chunks interleaved so a chunk is one vector load and each of its slots meets consecutive
activations); activations fp16 or bf16 ``(M, K)``; outputs the activation dtype.

GEMV (``M <= GEMV_MAX_M``): broadcast-multiply-sum in float32, no ``tl.dot``. The per-group rule is applied
once per 32-code chunk, not per weight: per chunk the kernel sums ``x * value`` and (when needed) ``x``,
then ``a * (sum_xv - z * sum_x)`` (zero point), ``a * sum_xv`` (symmetric) or
``a * sum_{v>=0} x v + b * sum_{v<0} x v`` (AFPQ two scales). Uniform INT grids never convert an integer
to float: the code's bits are OR-ed into the mantissa of 1.0, giving ``1 + c / 2**bits`` in two integer
ops, and ``sum_x c = 2**bits * (sum_x f - sum_x)`` is recovered per chunk (the cancellation loses at most
``bits`` bits of the 24, far inside the tests' tolerance).

GEMM (``M > GEMV_MAX_M``): a ``[BLOCK_N, chunks, slots, W]`` tile is decoded, scaled, reshaped to
``[BLOCK_N, BLOCK_K]`` in natural K order and multiplied with ``tl.dot`` (rounded to the activation dtype,
fp32 accumulation).

Split-K partial sums meet without atomics on the output: each split writes an fp32 partial tile to a
workspace, and the last split to arrive at a tile (an atomic counter per tile, reset by that last
split) sums them and writes the output in the activation dtype. So a call is one launch: no zero-fill and
no conversion kernels. Twin: :func:`hf_efficient.kernels.quant_reference.quant_matmul_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import SCHEMES
from .autotune import autotune, fixed, interpreting, max_split
from .quant_layout import KernelWeight

GEMV_MAX_M = 8
# The kernels take a scheme's mode as ``MODE: tl.constexpr`` and compile one branch of each rule below.
SYM = tl.constexpr(SCHEMES["sym"].mode)
ZERO_POINT = tl.constexpr(SCHEMES["zero_point"].mode)
TWO_SCALE = tl.constexpr(SCHEMES["two_scale"].mode)
_ONE = tl.constexpr(0x3F800000)  # float32 1.0, as bits
# Triton compiles one variant per divisibility-by-16 / ==1 pattern of the integer arguments: with all of them
# specialized, every new (M, N, K) meant a fresh compile, which made fuzzing and varied shapes compile-bound.
# Two stay specialized: the row stride KW (a 32-code chunk loads as one 128-bit access) and K (with K % 16
# known, the activation masks are uniform over each slot's W codes, so activations load as vectors and the
# GEMV loop is markedly shorter). Figures: docs/gpu_kernels.md, "Why the kernels are written as they are".
SHAPE_ARGS = ["M", "N", "P0W", "NG", "NC", "CPG", "GROUP", "M_BUCKET"]
# ptxas keeps neither of the two constants of ``(w << s) & mask | 1.0`` in a register: it re-materialises one per
# weight. ``(w & mask) * 2**s + 1.0`` written as one PTX ``mad`` becomes a single LEA with 1.0 in a register
# (instruction counts in docs/gpu_kernels.md). The interpreter runs no PTX: plain ops there.
_PTX = tl.constexpr(not interpreting())


@triton.jit
def slot_code(wa, wb, offs_i, J: tl.constexpr, BITS: tl.constexpr):
    """Integer codes of slot ``J`` of a chunk tile (``wa``: words ``[..., W]``, ``wb``: 3-bit top-bit words)."""
    if BITS == 3:
        c = ((wa >> (2 * J)) & 3) | (((wb >> (2 * J + offs_i)) & 1) << 2)
    else:
        c = (wa >> (J * BITS)) & ((1 << BITS) - 1)
    return c


@triton.jit
def slot_unit(wa, wb, offs_i, J: tl.constexpr, BITS: tl.constexpr):
    """``1 + code / 2**BITS`` (float32) of slot ``J``: the code's bits moved under the exponent of 1.0."""
    if BITS == 3:
        if 2 * J <= 20:
            lo = (wa << (20 - 2 * J)) & (3 << 20)
        else:
            lo = (wa >> (2 * J - 20)) & (3 << 20)
        if 2 * J + 1 <= 22:
            hi = (wb << (22 - 2 * J - offs_i)) & (1 << 22)
        else:
            hi = (wb >> (2 * J + offs_i - 22)) & (1 << 22)
        t = lo | hi
    else:
        POS: tl.constexpr = 23 - BITS
        if _PTX:
            return shift_or_one(wa, J * BITS, BITS, POS)
        if J * BITS <= POS:
            t = (wa << (POS - J * BITS)) & (((1 << BITS) - 1) << POS)
        else:
            t = (wa >> (J * BITS - POS)) & (((1 << BITS) - 1) << POS)
    return (t | _ONE).to(tl.float32, bitcast=True)


@triton.jit
def shift_or_one(w, LO: tl.constexpr, BITS: tl.constexpr, POS: tl.constexpr):
    """float32 bits ``1.0 | (bits LO..LO+BITS of w moved to POS..)`` as ``mad`` (``mad.hi`` for right moves)."""
    MSK: tl.constexpr = ((1 << BITS) - 1) << LO
    if MSK >= 2 ** 31:
        m = w & (MSK - 2 ** 32)  # the same bits as a signed int32 constant
    else:
        m = w & MSK
    # a left move multiplies by 2**(POS-LO) (low word); a right one takes the high word of m * 2**(32+POS-LO)
    HALF: tl.constexpr = "lo" if LO <= POS else "hi"
    MUL: tl.constexpr = 1 << (POS - LO) if LO <= POS else 1 << (32 + POS - LO)
    r = tl.inline_asm_elementwise(f"mad.{HALF}.u32 $0, $1, {MUL}, {_ONE};", "=r,r", [m], dtype=tl.int32,
                                  is_pure=True, pack=1)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def decode_values(c, t_ptr, v_off, DECODE: tl.constexpr):
    """Grid value (fp32) of each code: table read, ``code + v_off`` (INT) or E2M1 bits via fp16."""
    if DECODE == 0:
        v = tl.load(t_ptr + c)
    elif DECODE == 1:
        v = c.to(tl.float32) + v_off
    else:
        # sign -> fp16 bit 15, exponent+mantissa (3 bits) -> fp16 bits 9..11; the result is the E2M1
        # value times 2**-14 (exponent 0 lands on fp16 subnormals, exactly the E2M1 subnormal 0.5).
        h = ((c & 8) << 12) | ((c & 7) << 9)
        v = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
    return v


@triton.jit
def apply_params(v, a, b, MODE: tl.constexpr):
    """The format's scale rule (``Scheme.apply``): sym, zero point, or AFPQ two scales."""
    if MODE == SYM:
        w = v * a
    elif MODE == ZERO_POINT:
        w = (v - b) * a
    else:
        w = v * tl.where(v < 0, b, a)
    return w


@triton.jit
def int_weights(c, a, b, v_off, BITS: tl.constexpr, MODE: tl.constexpr):
    """Uniform INT grid, sym or zero point: ``(c + v_off - z) * a`` (``[BN, BC, P, W]`` codes, ``[BN, BC]`` params)
    as one FMA per weight, ``f * (a 2**BITS) + (v_off - z - 2**BITS) a`` with ``f = 1 + c / 2**BITS`` made by
    moving the code's bits under the exponent of 1.0: no int-to-float conversion and no per-weight subtraction
    (a shorter GEMM loop; docs/gpu_kernels.md). The FMA rounds once, so the error stays below
    2**-24 of ``(c + v_off - z) a``'s larger terms, far inside the GEMM's bf16/fp16 weight rounding."""
    f = ((c << (23 - BITS)) | _ONE).to(tl.float32, bitcast=True)
    z = b if MODE == ZERO_POINT else 0.0
    scale = a * (1 << BITS)
    offset = (v_off - z - (1 << BITS)) * a
    return f * scale[:, :, None, None] + offset[:, :, None, None]


@triton.jit
def load_params(p_ptr, g, offs_n, mask, N, NG):
    """``a``, ``b`` (fp32) of groups ``g`` for rows ``offs_n`` (params are ``(2, N, NG)``)."""
    a = tl.load(p_ptr + offs_n * NG + g, mask=mask, other=0).to(tl.float32)
    b = tl.load(p_ptr + N * NG + offs_n * NG + g, mask=mask, other=0).to(tl.float32)
    return a, b


@triton.jit
def load_chunks(q_ptr, offs_n, ch, mask_nc, KW, P0W, BITS: tl.constexpr):
    """Words of chunks ``ch`` for rows ``offs_n``: ``wa`` ``[BN, BC, W]`` and (3 bits) the top-bit plane ``wb``."""
    W: tl.constexpr = 2 if BITS == 3 else BITS
    offs_i = tl.arange(0, W)
    row = q_ptr + offs_n[:, None, None] * KW
    wa = tl.load(row + ch[None, :, None] * W + offs_i[None, None, :], mask=mask_nc[:, :, None], other=0)
    if BITS == 3:
        wb = tl.load(row + P0W + ch[None, :, None], mask=mask_nc[:, :, None], other=0)
    else:
        wb = wa
    return wa, wb


@triton.jit
def load_step(q_ptr, p_ptr, offs_n, mask_n, offs_c, s, s_hi, N, NG, NC, CPG, KW, P0W, BLOCK_C: tl.constexpr,
              BITS: tl.constexpr):
    """Weights and group parameters of K step ``s`` (nothing is read when ``s >= s_hi``): ``(wa, wb, a, b, ch)``."""
    ch = s * BLOCK_C + offs_c
    mask_nc = mask_n[:, None] & (ch < tl.minimum(NC, s_hi * BLOCK_C))[None, :]  # step s_hi starts at chunk s_hi*BC
    wa, wb = load_chunks(q_ptr, offs_n, ch, mask_nc, KW, P0W, BITS)
    a, b = load_params(p_ptr, (ch // CPG)[None, :], offs_n[:, None], mask_nc, N, NG)
    return wa, wb, a, b, ch


@triton.jit
def store_split(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K: tl.constexpr):
    """Write the ``[BM, BN]`` fp32 ``acc``; with split-K, the last split of the tile sums the workspace."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    idx = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + pid_k * M * N + idx, acc, mask=mask)
        # every thread's partial is written before the release below (the CUTLASS semaphore pattern)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                # .cg: read the other splits' partials from L2, never a stale L1 line
                total += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + idx, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (and CUDA-graph replays)


@triton.jit
def chunk_sums(wa, wb, xb, kk, xmask, K, offs_i, t_ptr, v_off, BITS: tl.constexpr, MODE: tl.constexpr,
               DECODE: tl.constexpr):
    """Per-chunk sums over the 32 codes of each chunk: ``(sum x*f, sum x*min(v, 0), sum x)``.

    Shape-polymorphic: ``wa``/``wb`` are ``[..., BN, BC, W]`` words and ``xb``/``kk``/``xmask`` the pointers,
    K indices and row mask of slot 0's activations, broadcastable against them (``[1, BC, W]`` for one row:
    everything stays 3-D, no layout change between the weight load and the multiply; ``[BM, 1, BC, W]``
    for several rows). ``f`` is ``1 + c/2**BITS`` for uniform INT grids (see module docstring), else ``v``.
    """
    W: tl.constexpr = 2 if BITS == 3 else BITS
    P: tl.constexpr = 32 // W
    FAST_INT: tl.constexpr = DECODE == 1 and MODE != TWO_SCALE
    x0 = tl.load(xb, mask=xmask & (kk < K), other=0.0).to(tl.float32)
    sx = x0
    if FAST_INT:
        f0 = slot_unit(wa, wb, offs_i, 0, BITS)
    else:
        f0 = decode_values(slot_code(wa, wb, offs_i, 0, BITS), t_ptr, v_off, DECODE)
    s1 = x0 * f0
    s2 = x0 * tl.minimum(f0, 0.0)
    for j in tl.static_range(1, P):
        xj = tl.load(xb + j * W, mask=xmask & (kk + j * W < K), other=0.0).to(tl.float32)
        if FAST_INT:
            v = slot_unit(wa, wb, offs_i, j, BITS)
        else:
            v = decode_values(slot_code(wa, wb, offs_i, j, BITS), t_ptr, v_off, DECODE)
        s1 += xj * v
        if MODE == TWO_SCALE:
            s2 += xj * tl.minimum(v, 0.0)
        sx += xj
    return tl.sum(s1, axis=-1), tl.sum(s2, axis=-1), tl.sum(sx, axis=-1)


@triton.jit
def combine_chunks(c1, c2, cx, a, b, v_off, BITS: tl.constexpr, MODE: tl.constexpr, DECODE: tl.constexpr):
    """The group rule applied to per-chunk sums (``a``, ``b``: the chunk's group parameters)."""
    if DECODE == 1 and MODE != TWO_SCALE:
        c1 = (c1 - cx) * (1 << BITS) + v_off * cx
    if MODE == SYM:
        r = a * c1
    elif MODE == ZERO_POINT:
        r = a * (c1 - b * cx)
    else:
        r = a * (c1 - c2) + b * c2
    return r


@autotune("gemv")
@triton.jit(do_not_specialize=SHAPE_ARGS)
def _gemv_kernel(x_ptr, q_ptr, p_ptr, t_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, P0W, NG, NC, CPG, GROUP, v_off,
                 M_BUCKET, BITS: tl.constexpr, MODE: tl.constexpr, DECODE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    W: tl.constexpr = 2 if BITS == 3 else BITS
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_i = tl.arange(0, W)
    mask_n = offs_n < N
    mask_m = offs_m < M
    steps = tl.cdiv(NC, BLOCK_C)
    per = tl.cdiv(steps, SPLIT_K)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_C], dtype=tl.float32)
    s_lo = pid_k * per
    s_hi = tl.minimum(steps, (pid_k + 1) * per)
    if PREFETCH:
        nxt = load_step(q_ptr, p_ptr, offs_n, mask_n, offs_c, s_lo, s_hi, N, NG, NC, CPG, KW, P0W, BLOCK_C, BITS)
    for s in range(s_lo, s_hi):
        if PREFETCH:
            # the next step's weights are requested before this step's arithmetic: their DRAM latency overlaps it
            wa, wb, a, b, ch = nxt
            nxt = load_step(q_ptr, p_ptr, offs_n, mask_n, offs_c, s + 1, s_hi, N, NG, NC, CPG, KW, P0W, BLOCK_C, BITS)
        else:
            wa, wb, a, b, ch = load_step(q_ptr, p_ptr, offs_n, mask_n, offs_c, s, s_hi, N, NG, NC, CPG, KW, P0W,
                                         BLOCK_C, BITS)
        kk = ch[None, :, None] * 32 + offs_i[None, None, :]  # [1, BC, W]: k of slot 0
        if BLOCK_M == 1:
            c1, c2, cx = chunk_sums(wa, wb, x_ptr + kk, kk, kk >= 0, K, offs_i, t_ptr, v_off, BITS, MODE, DECODE)
            acc += combine_chunks(c1, c2, cx, a, b, v_off, BITS, MODE, DECODE)
        else:
            c1, c2, cx = chunk_sums(wa[None], wb[None], x_ptr + offs_m[:, None, None, None] * K + kk[None], kk[None],
                                    mask_m[:, None, None, None], K, offs_i, t_ptr, v_off, BITS, MODE, DECODE)
            acc += combine_chunks(c1, c2, cx, a[None], b[None], v_off, BITS, MODE, DECODE)
    if BLOCK_M == 1:
        res = tl.sum(acc, 1)[None, :]
    else:
        res = tl.sum(acc, 2)
    store_split(res, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K)


@autotune("gemm")
@triton.jit(do_not_specialize=SHAPE_ARGS)
def _gemm_kernel(x_ptr, q_ptr, p_ptr, t_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, P0W, NG, NC, CPG, GROUP, v_off,
                 M_BUCKET, BITS: tl.constexpr, MODE: tl.constexpr, DECODE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    W: tl.constexpr = 2 if BITS == 3 else BITS
    P: tl.constexpr = 32 // W
    BLOCK_K: tl.constexpr = BLOCK_C * 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_i = tl.arange(0, W)
    offs_j = tl.arange(0, P)
    mask_n = offs_n < N
    mask_m = offs_m < M
    steps = tl.cdiv(NC, BLOCK_C)
    per = tl.cdiv(steps, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(pid_k * per, tl.minimum(steps, (pid_k + 1) * per)):
        ch = s * BLOCK_C + offs_c
        mask_nc = mask_n[:, None] & (ch < NC)[None, :]
        wa, wb = load_chunks(q_ptr, offs_n, ch, mask_nc, KW, P0W, BITS)
        # [BN, BC, P, W]: slot j of word i is code j*W + i of the chunk, so a row-major reshape is K order
        if BITS == 3:
            c = (((wa[:, :, None, :] >> (2 * offs_j)[None, None, :, None]) & 3)
                 | (((wb[:, :, None, :] >> (2 * offs_j[None, None, :, None] + offs_i[None, None, None, :])) & 1) << 2))
        else:
            c = (wa[:, :, None, :] >> (BITS * offs_j)[None, None, :, None]) & ((1 << BITS) - 1)
        a, b = load_params(p_ptr, (ch // CPG)[None, :], offs_n[:, None], mask_nc, N, NG)
        if DECODE == 1 and MODE != TWO_SCALE:
            w = int_weights(c, a, b, v_off, BITS, MODE)
        else:
            w = apply_params(decode_values(c, t_ptr, v_off, DECODE), a[:, :, None, None], b[:, :, None, None], MODE)
        k0 = s * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        acc = tl.dot(x, tl.trans(tl.reshape(w, [BLOCK_N, BLOCK_K]).to(x.dtype)), acc)
    tile = pid_m * tl.num_programs(1) + pid_n
    store_split(acc, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, tile, pid_k, SPLIT_K)


_DTYPES = (torch.float16, torch.bfloat16)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters of the split-K epilogue: zero between launches (the last split resets)."""
    t = _COUNTERS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = t
    return t


def _check(x: torch.Tensor, kw: KernelWeight) -> None:
    if x.dim() != 2 or x.shape[1] != kw.K:
        raise ValueError(f"x must be (M, K={kw.K}), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float16 or bfloat16, got {x.dtype}")
    if x.device != kw.qweight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {kw.qweight.device}")


def _launch(kernel, name: str, x: torch.Tensor, kw: KernelWeight, block_m: int | None, config: dict | None):
    _check(x, kw)
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, kw.N, device=x.device, dtype=x.dtype)
    if m == 0 or kw.N == 0:
        return out
    if kw.K == 0:
        return out.zero_()
    split = config.get("SPLIT_K", 1) if config else max_split(
        name, {"M": m, "BITS": kw.bits, "BLOCK_M": block_m or 1, "GROUP": kw.group_size})
    ws = torch.empty(split * m * kw.N if split > 1 else 1, device=x.device, dtype=torch.float32)
    tiles_m = lambda meta: triton.cdiv(m, meta["BLOCK_M"]) if block_m is None else 1  # noqa: E731
    if name == "gemv":
        grid = lambda meta: (triton.cdiv(kw.N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    else:
        grid = lambda meta: (tiles_m(meta), triton.cdiv(kw.N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    cnt = _counters(x.device, triton.cdiv(m, 16) * triton.cdiv(kw.N, 16))
    launch = fixed(kernel, name, config)(grid) if config else kernel[grid]
    extra = {} if block_m is None else {"BLOCK_M": block_m}
    launch(x, kw.qweight, kw.params, kw.table, out, ws, cnt, m, kw.N, kw.K, kw.KW, kw.plane0_words, kw.n_groups,
           kw.Kp // 32, kw.group_size // 32, kw.group_size, kw.v_off, min(triton.next_power_of_2(m), 128),
           BITS=kw.bits, MODE=kw.mode, DECODE=kw.decode, **extra)
    return out


def quant_gemv(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 with ``1 <= M <= GEMV_MAX_M`` -> (M, N) in x's dtype.

    ``config`` (a dict of the "gemv" space) bypasses autotuning."""
    if not 1 <= x.shape[0] <= GEMV_MAX_M:
        raise ValueError(f"quant_gemv takes 1..{GEMV_MAX_M} rows, got M={x.shape[0]} (use quant_gemm)")
    return _launch(_gemv_kernel, "gemv", x, kw, triton.next_power_of_2(x.shape[0]), config)


def quant_gemm(x: torch.Tensor, kw: KernelWeight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 (any M >= 1) -> (M, N) in x's dtype, tensor cores."""
    return _launch(_gemm_kernel, "gemm", x, kw, None, config)
