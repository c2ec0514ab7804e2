// T-MAC-style LUT GEMV/GEMM on the CPU as torch ops: y = x @ W^T with W in 1..4-bit codes.
// Layouts and engines: csrc/lut/engine.h (ATen-free, one source per ISA, chosen at run time by
// csrc/lut/dispatch.cpp). The plain-torch twin is kernels/lut_cpu_reference.py. half_gemm: the same for a float16
// weight (csrc/lut/half.cpp; its twin is F.linear on the widened weight).
//
// Decode-sized inputs (M <= max rows, default kMaxLutRows) run the table engines, one LUT pass per row;
// larger inputs (prefill) dequantize row blocks of the weight into a cache-sized float buffer and run
// torch's float GEMM (BLAS) per block, so no float copy of the whole layer exists at any time.
//
// Engine choice: the best ISA of the CPU; HF_EFFICIENT_LUT_ISA=scalar|avx2|avx512|neon caps it,
// HF_EFFICIENT_LUT_SCALAR=1 (or force_scalar) forces the scalar engine (both also cap the float GEMV of the decode
// ops); HF_EFFICIENT_LUT_MAX_ROWS moves the
// table/GEMM crossover (both read per call, so tests and benchmarks can switch them).
#include "lut_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace hf_efficient {
namespace lut {

constexpr int64_t kMaxLutRows = 32;
// Float bytes of one dequantized row block in the prefill path: about a quarter of a 1-2 MiB L2, so the
// block stays resident while the GEMM sweeps the activations over it.
constexpr int64_t kBlockBytes = 512 << 10;

static const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? v : nullptr;
}

static Isa isa_cap(bool force_scalar) {
  const char* s = env("HF_EFFICIENT_LUT_SCALAR");
  if (force_scalar || (s != nullptr && std::strcmp(s, "0") != 0)) return Isa::kScalar;
  Isa cap = detect_isa();
  if (const char* want = env("HF_EFFICIENT_LUT_ISA")) {
    Isa w;
    TORCH_CHECK(parse_isa(want, &w), "HF_EFFICIENT_LUT_ISA must be scalar, neon, avx2 or avx512, got '", want, "'");
    cap = static_cast<int>(w) < static_cast<int>(cap) ? w : cap;
  }
  if (cap == Isa::kScalar && !force_scalar && s == nullptr && env("HF_EFFICIENT_LUT_ISA") == nullptr)
    TORCH_WARN_ONCE("hf_efficient lut: no SIMD engine for this CPU; using the (slower) scalar LUT kernels");
  return cap;
}

static int64_t max_lut_rows() {
  const char* v = env("HF_EFFICIENT_LUT_MAX_ROWS");
  return v != nullptr ? std::max<int64_t>(0, std::atoll(v)) : kMaxLutRows;
}

static Geometry geometry_or_throw(int64_t K, int64_t N, int64_t bits, int64_t group_size, bool codes,
                                  int64_t channels) {
  Geometry g;
  const std::string err = make_geometry(K, N, bits, group_size, codes, channels, &g);
  TORCH_CHECK(err.empty(), err);
  return g;
}

static int64_t grid_channels(const c10::optional<at::Tensor>& grid, int64_t bits) {
  if (!grid.has_value()) return 1;
  const at::Tensor& gr = *grid;
  TORCH_CHECK(bits >= 1 && bits <= 4, "lut: bits must be 1, 2, 3 or 4, got ", bits);
  TORCH_CHECK(gr.scalar_type() == at::kFloat && gr.dim() == 2 && gr.size(1) == (int64_t(1) << bits),
              "lut: grid must be float32 (channels, 2**bits) = (*, ", int64_t(1) << bits, "), got ",
              gr.scalar_type(), " ", gr.sizes());
  return gr.size(0);
}

static Geometry checked_geometry(const at::Tensor& x, const c10::optional<at::Tensor>& grid, int64_t bits,
                                 int64_t group_size, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu(), "lut: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "lut: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "lut: x must be 2-D (M, in_features), got shape ", x.sizes());
  return geometry_or_throw(x.size(1), out_features, bits, group_size, grid.has_value(), grid_channels(grid, bits));
}

static void check_weights(const Geometry& geo, const at::Tensor& qweight) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.device().is_cpu(),
              "lut: qweight must be a contiguous uint8 CPU tensor, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.numel() == geo.NT * geo.tile_bytes(), "lut: qweight has ", qweight.numel(),
              " bytes but in_features=", geo.K, ", out_features=", geo.N, ", bits=", geo.bits, ", group_size=",
              geo.G, ", channels=", geo.channels, " need ", geo.NT * geo.tile_bytes(),
              " (was it packed for another shape?)");
  // The fp16 coefficients are read in place: their offsets are multiples of 32 from the base.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 2 == 0, "lut: qweight must be 2-byte aligned");
}

Geometry lut_geometry(int64_t K, int64_t N, const c10::optional<at::Tensor>& grid, int64_t bits, int64_t group_size) {
  return geometry_or_throw(K, N, bits, group_size, grid.has_value(), grid_channels(grid, bits));
}

void lut_check_weights(const Geometry& geo, const at::Tensor& qweight) { check_weights(geo, qweight); }

Engine lut_engine(const Geometry& geo, bool force_scalar) { return select_engine(geo, isa_cap(force_scalar)); }

Isa lut_isa_cap() { return isa_cap(false); }

Engine lut_engine(const Geometry& geo, Isa cap) { return select_engine(geo, cap); }

int64_t lut_table_parts(const Geometry& geo) { return geo.channels == 1 ? geo.ng : 1; }

void lut_row_tables_size(const Geometry& geo, RowTables* t) {
  const auto grow = [](auto& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  };
  grow(t->tab, geo.table_stride());
  grow(t->tscale, geo.ng);
  grow(t->gsum, geo.ng);
}

void lut_row_tables_part(const float* x, const Geometry& geo, const float* coeffs, const Engine& eng, RowTables* t,
                         int64_t p0, int64_t p1) {
  if (p0 >= p1) return;
  // Groups [g0, g1) as a geometry of their own: the builders index activations, tables and scales by group and
  // slot from 0, and read nothing else of the geometry (with one channel; two channels are one part).
  const int64_t g0 = geo.channels == 1 ? p0 : 0, g1 = geo.channels == 1 ? p1 : geo.ng;
  Geometry sub = geo;
  const int64_t k0 = g0 * geo.G, k1 = std::min(geo.Kp, g1 * geo.G);
  sub.K = sub.Kp = k1 - k0;
  sub.ng = g1 - g0;
  sub.slots = sub.Kp / sub.slot;
  // per-thread scratch, reused across calls (decode runs hundreds of these per token)
  thread_local std::vector<float> xp, ft;
  xp.resize(static_cast<size_t>(sub.Kp));
  ft.resize(static_cast<size_t>(geo.channels * (geo.G / geo.slot) * 16));
  const int64_t kx = std::max<int64_t>(0, std::min(geo.K, k1) - k0);  // real activations; the rest is padding
  std::memcpy(xp.data(), x + k0, sizeof(float) * kx);
  std::fill(xp.begin() + kx, xp.end(), 0.0f);
  eng.build(xp.data(), geo.channels == 1 ? sub : geo, coeffs, ft.data(), t->tab.data() + k0 / geo.slot * 16,
            t->tscale.data() + g0, t->gsum.data() + g0);
}

void lut_row_tables(const float* x, const Geometry& geo, const float* grid, const Engine& eng, RowTables* t) {
  const std::vector<float> coeffs = table_coeffs(geo, grid);
  lut_row_tables_size(geo, t);
  lut_row_tables_part(x, geo, coeffs.data(), eng, t, 0, lut_table_parts(geo));
}

void lut_row_tile_range(const uint8_t* w, const Geometry& geo, const Engine& eng, const RowTables& t, float* y,
                        int64_t nt0, int64_t nt1) {
  const int64_t tb = geo.tile_bytes(), N = geo.N;
  const TileFn fn = eng.tile;
  const int8_t* tab = t.tab.data();
  const float *ts = t.tscale.data(), *gs = t.gsum.data();
  alignas(64) float yt[kTileN];
  for (int64_t nt = nt0; nt < nt1; ++nt) {
    fn(w + nt * tb, tab, ts, gs, geo, yt);
    std::memcpy(y + nt * kTileN, yt, sizeof(float) * std::min(kTileN, N - nt * kTileN));
  }
}

void lut_row_tiles(const uint8_t* w, const Geometry& geo, const Engine& eng, const RowTables& t, float* y) {
  at::parallel_for(0, geo.NT, 1, [&](int64_t b, int64_t e) { lut_row_tile_range(w, geo, eng, t, y, b, e); });
}

void lut_gemv_row(const float* x, const uint8_t* w, const float* grid, const Geometry& geo, const Engine& eng,
                  float* y) {
  // The tables are built by all threads (a part each) and kept between calls (the calling thread's; the team
  // reads them through this pointer), then the tiles run in the same parallel region: with many threads the
  // tile loop is short and a serial build, or its allocation, would be a large share of it.
  thread_local RowTables tables;
  RowTables* t = &tables;
  const std::vector<float> coeffs = table_coeffs(geo, grid);
  lut_row_tables_size(geo, t);
  const int64_t parts = lut_table_parts(geo);
  run_team([&](int tid, int nt) {
    const auto pr = team_range(parts, tid, nt);
    lut_row_tables_part(x, geo, coeffs.data(), eng, t, pr.first, pr.second);
    team_barrier();
    const auto tr = team_range(geo.NT, tid, nt);
    lut_row_tile_range(w, geo, eng, *t, y, tr.first, tr.second);
  });
}

struct Tables {
  at::Tensor tab, tscale, gsum;
};

static Tables make_tables(const at::Tensor& xc, const Geometry& geo, const c10::optional<at::Tensor>& grid,
                          const Engine& eng) {
  const int64_t M = xc.size(0);
  Tables t{at::empty({M, geo.channels, geo.slots, 16}, xc.options().dtype(at::kChar)),
           at::empty({M, geo.ng}, xc.options()), at::empty({M, geo.ng}, xc.options())};
  at::Tensor gr = grid.has_value() ? grid->contiguous() : at::Tensor();
  const std::vector<float> coeffs = table_coeffs(geo, grid.has_value() ? gr.data_ptr<float>() : nullptr);
  const float* px = xc.data_ptr<float>();
  int8_t* tab = t.tab.data_ptr<int8_t>();
  float *ts = t.tscale.data_ptr<float>(), *gs = t.gsum.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<float> xp(static_cast<size_t>(geo.Kp), 0.0f);
    std::vector<float> ft(static_cast<size_t>(geo.channels * (geo.G / geo.slot) * 16));
    for (int64_t m = b; m < e; ++m) {
      std::memcpy(xp.data(), px + m * geo.K, sizeof(float) * geo.K);
      eng.build(xp.data(), geo, coeffs.data(), ft.data(), tab + m * geo.table_stride(), ts + m * geo.ng,
                gs + m * geo.ng);
    }
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lut_tables(const at::Tensor& x, const c10::optional<at::Tensor>& grid,
                                                          int64_t bits, int64_t group_size, bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, 1);
  Tables t = make_tables(x.contiguous(), geo, grid, select_engine(geo, isa_cap(force_scalar)));
  return {t.tab, t.tscale, t.gsum};
}

// Prefill: out = x @ W^T block by block, W's rows dequantized into a reused float buffer.
static void gemm_dequant(const at::Tensor& xc, const uint8_t* w, const float* grid, const Geometry& geo,
                         const Engine& eng, at::Tensor& out) {
  const int64_t tiles_per_block =
      std::max<int64_t>(1, std::min<int64_t>(geo.NT, kBlockBytes / (kTileN * geo.K * 4)));
  at::Tensor buf = at::empty({tiles_per_block * kTileN, geo.K}, xc.options());
  float* pb = buf.data_ptr<float>();
  for (int64_t t0 = 0; t0 < geo.NT; t0 += tiles_per_block) {
    const int64_t t1 = std::min(geo.NT, t0 + tiles_per_block);
    const int64_t n0 = t0 * kTileN, rows = std::min(geo.N, t1 * kTileN) - n0;
    at::parallel_for(t0, t1, 1, [&](int64_t b, int64_t e) {
      eng.dequant(w, grid, geo, b, e, pb + (b - t0) * kTileN * geo.K, geo.K);
    });
    at::Tensor o = out.narrow(1, n0, rows);
    at::mm_out(o, xc, buf.narrow(0, 0, rows).t());
  }
}

at::Tensor lut_gemm(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& grid,
                    int64_t bits, int64_t group_size, int64_t out_features, bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, out_features);
  check_weights(geo, qweight);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = geo.N;
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0) return out;
  const Engine eng = select_engine(geo, isa_cap(force_scalar));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  if (M > max_lut_rows()) {
    at::Tensor gr = grid.has_value() ? grid->contiguous() : at::Tensor();
    gemm_dequant(xc, w, grid.has_value() ? gr.data_ptr<float>() : nullptr, geo, eng, out);
    return out;
  }
  if (M == 1) {  // decode: the one-row GEMV that the fused decode step (csrc/decode_step.cpp) also runs
    at::Tensor gr = grid.has_value() ? grid->contiguous() : at::Tensor();
    lut_gemv_row(xc.data_ptr<float>(), w, grid.has_value() ? gr.data_ptr<float>() : nullptr, geo, eng,
                 out.data_ptr<float>());
    return out;
  }
  Tables t = make_tables(xc, geo, grid, eng);
  const int8_t* tab = t.tab.data_ptr<int8_t>();
  const float *ts = t.tscale.data_ptr<float>(), *gs = t.gsum.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t tb = geo.tile_bytes(), tab_stride = geo.table_stride();
  const TileFn fn = eng.tile;
  at::parallel_for(0, geo.NT, 1, [&](int64_t b, int64_t e) {
    alignas(64) float y[kTileN];
    for (int64_t nt = b; nt < e; ++nt) {
      const int64_t rows = std::min(kTileN, N - nt * kTileN);
      // The tile's weights stay in L1/L2 across activation rows.
      for (int64_t m = 0; m < M; ++m) {
        fn(w + nt * tb, tab + m * tab_stride, ts + m * geo.ng, gs + m * geo.ng, geo, y);
        std::memcpy(po + m * N + nt * kTileN, y, sizeof(float) * rows);
      }
    }
  });
  return out;
}

// The weights a packed stream holds, (out_features, in_features) float32 (the prefill path's dequantizer).
at::Tensor lut_dequant(const at::Tensor& qweight, const c10::optional<at::Tensor>& grid, int64_t bits,
                       int64_t group_size, int64_t in_features, int64_t out_features) {
  const Geometry geo = geometry_or_throw(in_features, out_features, bits, group_size, grid.has_value(),
                                         grid_channels(grid, bits));
  check_weights(geo, qweight);
  at::Tensor out = at::empty({geo.NT * kTileN, geo.K}, at::kFloat);
  at::Tensor gr = grid.has_value() ? grid->contiguous() : at::Tensor();
  const Engine eng = select_engine(geo, isa_cap(false));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, geo.NT, 1, [&](int64_t b, int64_t e) {
    eng.dequant(w, grid.has_value() ? gr.data_ptr<float>() : nullptr, geo, b, e, po + b * kTileN * geo.K, geo.K);
  });
  return out.narrow(0, 0, geo.N);
}

// The codes a packed stream holds, (out_features, in_features) uint8 (the inverse of the packing).
at::Tensor lut_codes(const at::Tensor& qweight, int64_t bits, int64_t group_size, int64_t in_features,
                     int64_t out_features, bool code_indexed) {
  const Geometry geo = geometry_or_throw(in_features, out_features, bits, group_size, code_indexed, 1);
  // channels do not change the code bytes, only the coefficient blocks: check the size for 1 or 2.
  Geometry geo2 = geo;
  if (code_indexed) geo2 = geometry_or_throw(in_features, out_features, bits, group_size, true, 2);
  TORCH_CHECK(qweight.numel() == geo.NT * geo.tile_bytes() || qweight.numel() == geo2.NT * geo2.tile_bytes(),
              "lut_codes: qweight has ", qweight.numel(), " bytes, which fits no layout of this shape");
  const Geometry& g = qweight.numel() == geo.NT * geo.tile_bytes() ? geo : geo2;
  check_weights(g, qweight);
  at::Tensor out = at::empty({g.NT * kTileN, g.Kp}, at::kByte);
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  uint8_t* po = out.data_ptr<uint8_t>();
  at::parallel_for(0, g.NT, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) tile_codes(w, g, t, po + t * kTileN * g.Kp);
  });
  return out.narrow(0, 0, g.N).narrow(1, 0, g.K).contiguous();
}

// y = x @ W^T for a float16 weight W (N, K) and float32 x (M, K): the fp16-table kernels (csrc/lut/half.cpp) for
// up to kHalfRows activation rows (decode: one pass over the half rows serves all of them), else W widened block
// by block into a cache-sized float buffer for the BLAS GEMM (never a float copy of the whole table).
constexpr int64_t kHalfRows = 4;

at::Tensor half_gemm(const at::Tensor& x, const at::Tensor& weight, bool force_scalar) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "half_gemm: x and weight must be CPU tensors, got ",
              x.device(), " and ", weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "half_gemm: x must be float32 (M, in_features), got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kHalf && weight.dim() == 2,
              "half_gemm: weight must be float16 (out_features, in_features), got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "half_gemm: x has ", x.size(1), " features, the weight ", weight.size(1));
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const HalfEngine eng = select_half_engine(isa_cap(force_scalar));
  const float* px = xc.data_ptr<float>();
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::Half>());
  float* po = out.data_ptr<float>();
  if (M <= kHalfRows) {
    at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) { eng.rows(px, M, pw, K, b, e, po, N); });
    return out;
  }
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(N, kBlockBytes / (K * 4)));
  at::Tensor buf = at::empty({block, K}, xc.options());
  float* pb = buf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t rows = std::min(block, N - n0);
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) { eng.widen(pw + (n0 + b) * K, (e - b) * K, pb + b * K); });
    at::Tensor o = out.narrow(1, n0, rows);
    at::mm_out(o, xc, buf.narrow(0, 0, rows).t());
  }
  return out;
}

std::string half_isa(bool force_scalar) { return isa_name(select_half_engine(isa_cap(force_scalar)).isa); }

std::string lut_isa(bool force_scalar) { return isa_name(isa_cap(force_scalar)); }

int64_t lut_max_rows() { return max_lut_rows(); }

}  // namespace lut
}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("lut_gemm(Tensor x, Tensor qweight, Tensor? grid, int bits, int group_size, int out_features, "
        "bool force_scalar=False) -> Tensor");
  m.def("lut_tables(Tensor x, Tensor? grid, int bits, int group_size, bool force_scalar=False) -> (Tensor, Tensor, Tensor)");
  m.def("lut_dequant(Tensor qweight, Tensor? grid, int bits, int group_size, int in_features, int out_features) -> Tensor");
  m.def("lut_codes(Tensor qweight, int bits, int group_size, int in_features, int out_features, bool code_indexed) -> Tensor");
  m.def("lut_isa(bool force_scalar=False) -> str", &hf_efficient::lut::lut_isa);
  m.def("lut_max_rows() -> int", &hf_efficient::lut::lut_max_rows);
  m.def("half_gemm(Tensor x, Tensor weight, bool force_scalar=False) -> Tensor");
  m.def("half_isa(bool force_scalar=False) -> str", &hf_efficient::lut::half_isa);
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("lut_gemm", &hf_efficient::lut::lut_gemm);
  m.impl("lut_tables", &hf_efficient::lut::lut_tables);
  m.impl("lut_dequant", &hf_efficient::lut::lut_dequant);
  m.impl("lut_codes", &hf_efficient::lut::lut_codes);
  m.impl("half_gemm", &hf_efficient::lut::half_gemm);
}
