// Internal C++ interface of the LUT GEMV (csrc/lut_gemm.cpp) for other translation units of the extension
// (csrc/decode_step.cpp): geometry and engine checks as the ops do them, and the one-row GEMV split into its
// two halves, so that several layers reading the same activation row (q/k/v, gate/up) build its tables once.
#pragma once
#include "lut/engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <utility>
#include <vector>

namespace hf_efficient {
namespace lut {

// Geometry of a packed weight (in_features K, out_features N) with the op's argument checks (TORCH_CHECK on
// bad arguments); grid: float32 (channels, 2**bits) for code-indexed weights, or none (bit-serial INT).
Geometry lut_geometry(int64_t K, int64_t N, const c10::optional<at::Tensor>& grid, int64_t bits, int64_t group_size);
// Checks that qweight is a contiguous uint8 CPU stream of geo's size.
void lut_check_weights(const Geometry& geo, const at::Tensor& qweight);
// The engine lut_gemm runs for geo (best ISA, capped by HF_EFFICIENT_LUT_ISA / HF_EFFICIENT_LUT_SCALAR).
Engine lut_engine(const Geometry& geo, bool force_scalar = false);
// The ISA cap lut_engine applies (also the cap of the decode ops' float GEMV, csrc/decode_step.cpp), and the engine
// for geo under a cap read once (the environment is read per call of lut_isa_cap, not per projection).
Isa lut_isa_cap();
Engine lut_engine(const Geometry& geo, Isa cap);

// Scratch tables of one activation row: int8 tab [channels][slots][16], tscale and gsum [ng].
struct RowTables {
  std::vector<int8_t> tab;
  std::vector<float> tscale, gsum;
};
// Builds the tables of one float row x[0..K) (grid: channels x 2**bits floats or nullptr) into t.
void lut_row_tables(const float* x, const Geometry& geo, const float* grid, const Engine& eng, RowTables* t);
// The same in parts, so that several threads build one row's tables: lut_row_tables_size sizes t (never
// shrinks it), then lut_row_tables_part builds parts [p0, p1) of lut_table_parts(geo) (coeffs: table_coeffs).
// A part is one weight group (groups are built independently); a two-channel geometry is one part.
int64_t lut_table_parts(const Geometry& geo);
void lut_row_tables_size(const Geometry& geo, RowTables* t);
void lut_row_tables_part(const float* x, const Geometry& geo, const float* coeffs, const Engine& eng, RowTables* t,
                         int64_t p0, int64_t p1);
// y[0..N) = W x from row tables built for a geometry with the same K, group size, bits, engine kind and grid
// (tables depend only on those); tiles run under at::parallel_for.
void lut_row_tiles(const uint8_t* w, const Geometry& geo, const Engine& eng, const RowTables& t, float* y);
// Tiles [nt0, nt1) of lut_row_tiles on the calling thread (to run several projections' tiles in one parallel
// region: csrc/decode_step.cpp).
void lut_row_tile_range(const uint8_t* w, const Geometry& geo, const Engine& eng, const RowTables& t, float* y,
                        int64_t nt0, int64_t nt1);
// Both: y = W x for one row (what lut_gemm runs for a one-row input, bit for bit).
void lut_gemv_row(const float* x, const uint8_t* w, const float* grid, const Geometry& geo, const Engine& eng,
                  float* y);

// One parallel region with phases: f(tid, nthreads) runs on every thread of one OpenMP team (the threads
// at::parallel_for uses), and the phases inside f sync at team_barrier(), which costs less than a fork/join per
// phase and lets every thread share the small serial steps between them. f must not throw (check first). Inside
// another parallel region, or with one thread, f(0, 1) runs on the calling thread.
template <class F>
void run_team(const F& f) {
#ifdef _OPENMP
  if (at::get_num_threads() > 1 && !at::in_parallel_region()) {
#pragma omp parallel
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  f(0, 1);
}

inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Thread tid's share [b, e) of n units: contiguous chunks, as at::parallel_for splits a range.
inline std::pair<int64_t, int64_t> team_range(int64_t n, int tid, int nthreads) {
  const int64_t c = (n + nthreads - 1) / nthreads, b = std::min(n, tid * c);
  return {b, std::min(n, b + c)};
}

}  // namespace lut
}  // namespace hf_efficient
