// The CUDA/PTX primitives the mma kernel (quant_mma.cuh) is written with. quant_mma_emu.h defines the same names
// for a CPU build of the kernel (HFE_MMA_EMULATE), so the kernel's own code is tested where there is no GPU; what
// the kernel uses of CUDA beyond this file (threadIdx, __syncthreads, __shfl_sync, atomics, __byte_perm, half
// conversions) is CUDA's own, emulated there too.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// The kernel's dynamic shared memory, and its launch.
#define HFE_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint32_t name[]
#define HFE_LAUNCH(kern, grid, block, smem, stream, ...) kern<<<grid, block, smem, stream>>>(__VA_ARGS__)

namespace hfe_mma {

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Asynchronous 16-byte global -> shared copies (cp.async, L2 only): weights and x wait in shared memory, not in
// registers, so a warp keeps several blocks in flight and a stage of x is one burst of loads, not a chain of
// dependent load-store pairs. src_bytes = 0 writes zeros (padding) without reading.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// "memory": the shared-memory reads of a landed block must not be hoisted above the wait.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shared memory by 32-bit shared-window addresses. pin() hides a value's origin from the compiler: the window
// address of the dynamic shared memory is otherwise recomputed (a special-register read and four more
// instructions) wherever it is used, once per block and more, because the decode kernel is short of registers.
__device__ __forceinline__ uint32_t pin(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}
__device__ __forceinline__ uint32_t shared_addr(const void* p) {
  return pin(static_cast<uint32_t>(__cvta_generic_to_shared(p)));
}
__device__ __forceinline__ uint32_t lds32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t a) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}

// Four 8x8 b16 matrices from shared memory: lane i gives the address of row i % 8 of matrix i / 8 (16 bytes);
// register j gets matrix j's row lane / 4, elements 2 (lane % 4) and +1 - an m16n8k16 B fragment register when
// the matrix is 8 rows of x by 8 consecutive K.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// (a & MASK) | b as one LOP3.
template <uint32_t MASK> __device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "r"(b));
  return r;
}

// 0xFFFF in each half of v whose sign bit is set, else 0: one PRMT (a selector nibble's top bit replicates the sign
// of the byte it selects; bytes 1 and 3 hold the halves' signs).
__device__ __forceinline__ uint32_t sign_mask2(uint32_t v) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(r) : "r"(v));
  return r;
}

}  // namespace hfe_mma
