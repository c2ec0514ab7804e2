"""The ``torch.ops.hf_efficient`` op surface: every op's schema and fake (meta) implementation, in one module.

Python ops are declared here with ``torch.library.custom_op``; the body of each is its plain-torch reference
(the kernels' twin, any device), and the module of each fast kernel registers it for its device with
``register_kernel``. C++ ops declare their schemas in ``csrc/`` (``TORCH_LIBRARY_FRAGMENT``; importing this
module loads them, :data:`HAS_CPP_OPS` says whether the build step ran) and get their fakes here. The fakes
let ``torch.compile`` and meta-device loading trace every op without a graph break.

Python ops (declared here; the fast kernels are registered by the module named):

* ``quant_matmul``: Triton GEMV/GEMM/LUT kernels on CUDA and under ``TRITON_INTERPRET=1``
  (:mod:`hf_efficient.quantization.gpu`); reference :func:`hf_efficient.kernels.quant_reference.quant_matmul_reference`.
* ``quant_mma``: the CUDA mma extension (:mod:`hf_efficient.kernels.quant_mma`); reference
  :func:`hf_efficient.kernels.quant_mma.dequantize_reference` times ``x``.
* ``quant_tinygemm``: torch's tinygemm (``aten._weight_int4pack_mm``) on CUDA for INT4 decode, dequantize +
  cuBLAS for prompts (:mod:`hf_efficient.kernels.quant_tinygemm`); reference
  :func:`hf_efficient.kernels.quant_tinygemm.dequantize_reference` times ``x``.
* ``seer_sparse_attention``, ``seer_pooled_attention``, ``seer_gate_indices``: Triton on CUDA
  (:mod:`hf_efficient.attention.seer.ops`); references in :mod:`hf_efficient.kernels.seer_reference`.

C++ ops (schemas and CPU kernels in ``csrc/``; fakes here where they return tensors):

* ``lut_gemm``, ``lut_tables``, ``lut_dequant``, ``lut_codes``, ``lut_isa``, ``lut_max_rows``
  (``csrc/lut_gemm.cpp``; glue :mod:`hf_efficient.kernels.lut_cpu`, reference
  :mod:`hf_efficient.kernels.lut_cpu_reference`).
* ``decode_attn_in``, ``decode_attn_out_mlp``, ``decode_linear``, ``decode_layers``, ``decode_layers_inplace``
  (``csrc/decode_step.cpp``; the fused decode step of :mod:`hf_efficient.quantization.lut.decode`).
* ``read_probe``, ``hugepage_empty`` (``csrc/memory.cpp``; no fake: they run eagerly, outside compiled graphs).

Call sites use ``torch.ops.hf_efficient.<name>``.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    from . import _C  # noqa: F401  (import registers the C++ ops)

    HAS_CPP_OPS = True
except ImportError as e:  # an install without the build step (e.g. a source checkout on PYTHONPATH)
    HAS_CPP_OPS = False
    logger.warning("hf_efficient C++ ops are not built (%s); reinstall with "
                   "`pip install --no-build-isolation .`", e)


# ------------------------------------------------------------------------------------------------
# Quantized matmuls (Python ops)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("hf_efficient::quant_matmul", mutates_args=())
def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, table: torch.Tensor, n: int, k: int,
                 bits: int, group_size: int, mode: int, decode: int, v_off: float, kernel: str) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 and W in the Triton kernel layout
    (:class:`~hf_efficient.kernels.quant_layout.KernelWeight`) -> (M, N) in x's dtype. ``kernel``: "auto",
    "gemv", "gemm" or "lut" (the fast kernels' choice; the reference ignores it)."""
    from .kernels.quant_layout import KernelWeight
    from .kernels.quant_reference import quant_matmul_reference

    return quant_matmul_reference(x, KernelWeight(qweight, params, table, n, k, bits, group_size, mode, decode,
                                                  v_off))


@quant_matmul.register_fake
def _quant_matmul_fake(x, qweight, params, table, n, k, bits, group_size, mode, decode, v_off, kernel):
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"quant_matmul: x must be (M, {k})")
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("hf_efficient::quant_mma", mutates_args=())
def quant_mma(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, tables: torch.Tensor, n: int, k: int,
              bits: int, group_size: int, mode: int, splits: int) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) fp16/bf16 and W in the mma layout
    (:class:`~hf_efficient.kernels.quant_mma.MmaWeight`) -> (M, N) in x's dtype; ``splits``: split-K factor of
    the CUDA kernel (0 = by shape; the reference ignores it)."""
    from .kernels.quant_mma import MmaWeight, dequantize_reference

    w = MmaWeight(qweight, params, tables, n, k, bits, group_size, mode)
    return (x.float() @ dequantize_reference(w, x.dtype).t()).to(x.dtype)


@quant_mma.register_fake
def _quant_mma_fake(x, qweight, params, tables, n, k, bits, group_size, mode, splits):
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"quant_mma: x must be (M, {k})")
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("hf_efficient::quant_tinygemm", mutates_args=())
def quant_tinygemm(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, n: int, k: int,
                   group_size: int) -> torch.Tensor:
    """``x @ W.T`` for ``x`` (M, K) and INT4 W in tinygemm's layout
    (:class:`~hf_efficient.kernels.quant_tinygemm.TinyWeight`) -> (M, N) in x's dtype."""
    from .kernels.quant_tinygemm import dequantize

    return (x.float() @ dequantize(qweight, sz, n, k, group_size, torch.float32).t()).to(x.dtype)


@quant_tinygemm.register_fake
def _quant_tinygemm_fake(x, qweight, sz, n, k, group_size):
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"quant_tinygemm: x must be (M, {k})")
    return x.new_empty(x.shape[0], n)


# ------------------------------------------------------------------------------------------------
# SeerAttention (Python ops)
# ------------------------------------------------------------------------------------------------

def bshd_view(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> same values as a view of a contiguous (B, S, H, D) buffer (the kernels' layout)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("hf_efficient::seer_sparse_attention", mutates_args=())
def seer_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                          kv_cnt: torch.Tensor, causal: bool, scale: float, block: int) -> torch.Tensor:
    """Block-sparse attention; see :func:`hf_efficient.kernels.seer_attention.sparse_attention`."""
    from .kernels import seer_reference as ref

    return bshd_view(ref.sparse_attention_reference(q, k, v, kv_idx, kv_cnt, causal=causal, scale=scale,
                                                    block=block))


@seer_sparse_attention.register_fake
def _sparse_fake(q, k, v, kv_idx, kv_cnt, causal, scale, block):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


@torch.library.custom_op("hf_efficient::seer_pooled_attention", mutates_args=())
def seer_pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                          block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention + block-max-pooled row-normalised map; see ``kernels.seer_attention.pooled_attention``."""
    from .kernels import seer_reference as ref

    out, pooled = ref.pooled_attention_reference(q, k, v, causal=causal, scale=scale, block=block)
    return bshd_view(out), pooled


@seer_pooled_attention.register_fake
def _pooled_fake(q, k, v, causal, scale, block):
    b, h, s, d = q.shape
    nkb = -(-k.shape[2] // block)
    return q.new_empty(b, s, h, d).transpose(1, 2), q.new_empty(b, h, -(-s // block), nkb, dtype=torch.float32)


@torch.library.custom_op("hf_efficient::seer_gate_indices", mutates_args=())
def seer_gate_indices(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, block: int,
                      theta: float, mode: str, threshold: float, top_k: int,
                      sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnGate scoring + block selection -> ``(kv_idx, kv_cnt)``; see ``kernels.seer_gate.gate_block_indices``."""
    from .kernels import seer_reference as ref

    return ref.gate_block_indices_reference(q, k, q_weight, k_weight, block=block, theta=theta, mode=mode,
                                            threshold=threshold, top_k=top_k, sparsity=sparsity)


@seer_gate_indices.register_fake
def _gate_fake(q, k, q_weight, k_weight, block, theta, mode, threshold, top_k, sparsity):
    b, h, s, _ = q.shape
    nqb, nkb = -(-s // block), -(-k.shape[2] // block)
    return q.new_empty(b, h, nqb, nkb, dtype=torch.int32), q.new_empty(b, h, nqb, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------
# C++ LUT ops: fakes (schemas and CPU kernels in csrc/lut_gemm.cpp)
# ------------------------------------------------------------------------------------------------

if HAS_CPP_OPS:
    from .kernels import lut_cpu_reference as _lut_ref

    @torch.library.register_fake("hf_efficient::lut_gemm")
    def _lut_gemm_fake(x, qweight, grid, bits, group_size, out_features, force_scalar=False):
        torch._check(x.dim() == 2, lambda: "lut_gemm: x must be 2-D")
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("hf_efficient::lut_tables")
    def _lut_tables_fake(x, grid, bits, group_size, force_scalar=False):
        kp = _lut_ref.padded_k(x.shape[1])
        ch = 1 if grid is None else grid.shape[0]
        ng = (kp + group_size - 1) // group_size
        slots = kp // _lut_ref.slot_size(bits, grid is not None)
        return (x.new_empty(x.shape[0], ch, slots, 16, dtype=torch.int8), x.new_empty(x.shape[0], ng),
                x.new_empty(x.shape[0], ng))

    @torch.library.register_fake("hf_efficient::lut_dequant")
    def _lut_dequant_fake(qweight, grid, bits, group_size, in_features, out_features):
        return qweight.new_empty(out_features, in_features, dtype=torch.float32)

    @torch.library.register_fake("hf_efficient::half_gemm")
    def _half_gemm_fake(x, weight, force_scalar=False):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "half_gemm: x and weight must be 2-D")
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("hf_efficient::decode_attn_in")
    def _decode_attn_in_fake(x, norm_weight, eps, weights, grids, biases, meta, cos, sin, num_heads, num_kv_heads,
                             head_dim):
        return (x.new_empty(1, num_heads, 1, head_dim), x.new_empty(1, num_kv_heads, 1, head_dim),
                x.new_empty(1, num_kv_heads, 1, head_dim))

    @torch.library.register_fake("hf_efficient::decode_attn_out_mlp")
    def _decode_attn_out_mlp_fake(q, k, v, mask, scaling, residual, norm_weight, eps, weights, grids, biases, meta):
        return torch.empty_like(residual)

    @torch.library.register_fake("hf_efficient::decode_layers")
    def _decode_layers_fake(x, norm_weights, eps, weights, grids, biases, meta, cos, sin, mask, scaling, num_heads,
                            num_kv_heads, head_dim, keys, values):
        def grown(t):  # the cache concat: one more position
            return t.new_empty(t.shape[0], t.shape[1], t.shape[2] + 1, t.shape[3])

        return torch.empty_like(x), [grown(k) for k in keys], [grown(v) for v in values]

    @torch.library.register_fake("hf_efficient::decode_layers_inplace")
    def _decode_layers_inplace_fake(x, norm_weights, eps, weights, grids, biases, meta, cos, sin, mask, scaling,
                                    num_heads, num_kv_heads, head_dim, key_buffers, value_buffers, past, key_halves,
                                    value_halves):
        return torch.empty_like(x)

    @torch.library.register_fake("hf_efficient::decode_linear")
    def _decode_linear_fake(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("hf_efficient::lut_codes")
    def _lut_codes_fake(qweight, bits, group_size, in_features, out_features, code_indexed):
        return qweight.new_empty(out_features, in_features, dtype=torch.uint8)
