// What the binding (quant_mma_binding.cpp) hands the kernel launcher (quant_mma.cuh).
#pragma once
#ifdef HFE_MMA_EMULATE
#include "quant_mma_emu.h"  // cudaStream_t
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

namespace hfe_mma {

// Scale schemes (= hf_efficient.schemes' modes): a v; a (v - z); a v+ + b v- (two scales by the sign of v).
constexpr int MODE_SYM = 0, MODE_ZERO = 1, MODE_TWO = 2;

struct Args {
  const void* x; int M, K, ldx;                                // activations (M, K), row stride ldx
  const uint32_t* qw; const void* params; const uint32_t* table;  // weight in the mma layout (table null: IntDecode)
  void* y; int N, Ntiles, KB, group, NG;                       // output (M, N); tiles of 16 rows, 128-K blocks
  int blocks_per_split, splits;                                // split-K: grid.y = splits
  float* ws; int* counters;                                    // split-K workspace (splits, M, Ntiles*16), counters
  bool bf16, params_f32;
  cudaStream_t stream;
};

// Rows of x per CTA, in 8-row MMA tiles: M <= 8 -> 1, <= 16 -> 2, else 8 (grid.z covers the rest).
inline int mtiles_for(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : 8; }
constexpr int WARPS = 8;  // warps per CTA
// 16-row tiles of W per warp: two where the kernel scales the A fragments (bfloat16, groups of whole 128-K blocks)
// at 8 M tiles, else one (quant_mma.cuh: NT). A CTA covers WARPS * tiles_per_warp tiles.
inline int tiles_per_warp(int M, bool bf16, int group) {
  return mtiles_for(M) == 8 && bf16 && group % 128 == 0 ? 2 : 1;
}

template <int BITS, int MODE> void launch(const Args& a);

}  // namespace hfe_mma
