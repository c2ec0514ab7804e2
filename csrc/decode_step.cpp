// One decode token (one query row, batch 1) of a Llama-style decoder layer in two torch ops, around the KV cache
// update that stays in Python (so any transformers Cache class keeps working):
//
//   decode_attn_in:      h = RMSNorm(x) -> q, k, v projections (+bias) -> rotary (rotate_half convention)
//                        -> q (1, heads, 1, d), k and v (1, kv_heads, 1, d)
//   (Python)             k_all, v_all = cache.update(k, v, layer_idx)
//   decode_attn_out_mlp: one-query attention over k_all/v_all (GQA: head h reads kv head h / (heads/kv_heads);
//                        scores * scaling (+ mask), softmax in fp32) -> o_proj -> + x -> RMSNorm -> gate, up
//                        -> silu(gate) * up -> down -> + residual -> (1, 1, hidden)
//
// Each projection is described by weights[i], grids[i], biases[i] and meta[4i..4i+4) = (bits, group_size,
// in_features, out_features): bits 1..4 = a LUT stream in the adopted cpu-lut layout (csrc/lut_gemm.cpp, engine.h;
// grid as lut_gemm takes it), bits 0 = a float32 (out_features, in_features) weight (gemv_f32 below; torch's mv if
// the weight is not contiguous). Projections
// that read the same row with the same table geometry (q/k/v, gate/up) share one build of the activation tables.
// The Python glue (and the reference these ops are tested against: the layer's own forward) is
// hf_efficient/quantization/lut/decode.py; their fakes belong with the others in hf_efficient/ops.py.
#include "lut_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace hf_efficient {
namespace lut {
namespace {

// A float GEMV's rows [n0, n1) of y = W x on the calling thread (one per ISA, below).
using RowsFn = void (*)(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, float* y);
RowsFn float_rows(Isa cap);

struct Proj {
  int64_t K = 0, N = 0;
  bool is_lut = false;
  at::Tensor weight;          // uint8 stream or float32 (N, K)
  at::Tensor grid;            // contiguous, LUT code-indexed only
  const uint8_t* stream = nullptr;  // LUT: weight's bytes, read once at parse (not per tile range)
  const float* grid_ptr = nullptr;  // LUT code-indexed: grid's values
  const float* fw = nullptr;        // float: the weight's values when it is contiguous
  RowsFn rows = nullptr;            // float: the GEMV for the CPU's ISA (capped as the LUT engines are)
  const float* bias = nullptr;
  at::Tensor bias_t;
  Geometry geo;
  Engine eng;
};

std::vector<Proj> parse_projs(const char* op, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& grids,
                              const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef meta, size_t n) {
  TORCH_CHECK(weights.size() == n && grids.size() == n && biases.size() == n && meta.size() == 4 * n, op,
              ": expected ", n, " projections (weights, grids, biases) and ", 4 * n, " meta ints, got ",
              weights.size(), ", ", grids.size(), ", ", biases.size(), " and ", meta.size());
  std::vector<Proj> ps(n);
  const Isa cap = lut_isa_cap();  // once per call: LUT engines and the float GEMV alike
  const RowsFn rows = float_rows(cap);
  for (size_t i = 0; i < n; ++i) {
    Proj& p = ps[i];
    const int64_t bits = meta[4 * i], gs = meta[4 * i + 1];
    p.K = meta[4 * i + 2];
    p.N = meta[4 * i + 3];
    p.weight = weights[i];
    TORCH_CHECK(p.weight.device().is_cpu(), op, ": projection ", i, " weight must be on the CPU");
    if (bits == 0) {
      TORCH_CHECK(p.weight.scalar_type() == at::kFloat && p.weight.dim() == 2 && p.weight.size(0) == p.N &&
                      p.weight.size(1) == p.K,
                  op, ": projection ", i, " (float) needs a float32 (", p.N, ", ", p.K, ") weight, got ",
                  p.weight.scalar_type(), " ", p.weight.sizes());
      if (p.weight.is_contiguous()) p.fw = p.weight.data_ptr<float>();
      p.rows = rows;
    } else {
      p.is_lut = true;
      const c10::optional<at::Tensor> g = grids.get(i);
      if (g.has_value()) p.grid = g->contiguous();
      p.geo = lut_geometry(p.K, p.N, g.has_value() ? c10::optional<at::Tensor>(p.grid) : c10::nullopt, bits, gs);
      lut_check_weights(p.geo, p.weight);
      p.eng = lut_engine(p.geo, cap);
      p.stream = p.weight.data_ptr<uint8_t>();
      p.grid_ptr = p.grid.defined() ? p.grid.data_ptr<float>() : nullptr;
    }
    const c10::optional<at::Tensor> b = biases.get(i);
    if (b.has_value()) {
      p.bias_t = b->contiguous();
      TORCH_CHECK(p.bias_t.scalar_type() == at::kFloat && p.bias_t.numel() == p.N && p.bias_t.device().is_cpu(),
                  op, ": projection ", i, " bias must be float32 with ", p.N, " values");
      p.bias = p.bias_t.data_ptr<float>();
    }
  }
  return ps;
}

// Row tables depend on K, group size, bits, the engine kind and the grid values, not on the output rows.
bool same_tables(const Proj& a, const Proj& b) {
  if (!a.is_lut || !b.is_lut) return false;
  const Geometry &x = a.geo, &y = b.geo;
  if (x.K != y.K || x.G != y.G || x.bits != y.bits || x.codes != y.codes || x.channels != y.channels ||
      a.eng.build != b.eng.build)
    return false;
  if (!x.codes) return true;
  return a.grid.numel() == b.grid.numel() &&
         std::memcmp(a.grid.data_ptr<float>(), b.grid.data_ptr<float>(), sizeof(float) * a.grid.numel()) == 0;
}

// Which projection's tables each of ps[0..n) reads when they all read one activation row: a LUT projection reads
// those of the first one with the same table geometry, and owner[i] == i builds them; float projections get -1.
void table_owners(const Proj* const* ps, size_t n, int* owner) {
  for (size_t i = 0; i < n; ++i) {
    owner[i] = -1;
    if (!ps[i]->is_lut) continue;
    for (size_t j = 0; j < i && owner[i] < 0; ++j)
      if (owner[j] == static_cast<int>(j) && same_tables(*ps[j], *ps[i])) owner[i] = static_cast<int>(j);
    if (owner[i] < 0) owner[i] = static_cast<int>(i);
  }
}

void gemv_f32(const Proj& p, const float* x, float* y);

// Output rows [n0, n1) of every projection of a project() call, once they are final (bias added).
using TileRowsFn = std::function<void(int64_t n0, int64_t n1)>;
// Independent work that rides along in a project() call's parallel region: units [0, n) after the tiles (the
// cache append's copies of the past, which need nothing of this layer's token), so that they are split over the
// threads instead of running on the main thread between regions.
struct SideWork {
  int64_t n = 0;
  std::function<void(int64_t unit)> run;
};

// y[0..N) = W x (+ bias) for projections that all read x; LUT ones with equal table geometry share tables, and
// the tiles of all LUT projections run in one parallel region (one fork/join per call, not one per projection:
// the projections of this model are a few microseconds each). rows, if given, then runs over all N rows; when
// every projection is a LUT one with the same N (gate/up), the region runs tile t of all of them on one thread
// and calls rows on that tile's rows right away (the SiLU product: split over the threads, on rows in L1).
void project(const std::vector<Proj*>& ps, const float* x, const std::vector<float*>& ys,
             const TileRowsFn& rows = nullptr, const SideWork& side = SideWork()) {
  // per-thread scratch, reused: the buffers keep their capacity between calls (the lambda below runs on other
  // threads too, so it reads them through this thread's pointer, never by the thread_local's name)
  thread_local std::vector<RowTables> scratch;
  if (scratch.size() < ps.size()) scratch.resize(ps.size());
  RowTables* tables = scratch.data();
  std::vector<int> owner(ps.size());
  table_owners(ps.data(), ps.size(), owner.data());
  std::vector<int64_t> first(ps.size() + 1, 0);  // global index of each LUT projection's first tile
  for (size_t i = 0; i < ps.size(); ++i) {
    const Proj& p = *ps[i];
    first[i + 1] = first[i];
    if (p.is_lut) {
      if (owner[i] == static_cast<int>(i)) lut_row_tables(x, p.geo, p.grid_ptr, p.eng, &tables[i]);
      first[i + 1] += p.geo.NT;
    } else if (p.weight.is_contiguous()) {
      gemv_f32(p, x, ys[i]);
    } else {
      at::Tensor xt = at::from_blob(const_cast<float*>(x), {p.K}, at::kFloat);
      at::Tensor yt = at::from_blob(ys[i], {p.N}, at::kFloat);
      at::mv_out(yt, p.weight, xt);
    }
  }
  const auto add_bias = [&](size_t i, int64_t n0, int64_t n1) {
    if (ps[i]->bias != nullptr)
      for (int64_t n = n0; n < n1; ++n) ys[i][n] += ps[i]->bias[n];
  };
  const int64_t N = ps[0]->N;
  bool paired = rows != nullptr && side.n == 0;
  for (const Proj* p : ps) paired = paired && p->is_lut && p->N == N;
  if (paired) {
    at::parallel_for(0, ps[0]->geo.NT, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n0 = t * kTileN, n1 = std::min(N, n0 + kTileN);
        for (size_t i = 0; i < ps.size(); ++i) {
          lut_row_tile_range(ps[i]->stream, ps[i]->geo, ps[i]->eng, tables[owner[i]], ys[i], t, t + 1);
          add_bias(i, n0, n1);
        }
        rows(n0, n1);
      }
    });
    return;
  }
  const int64_t tiles = first.back();
  at::parallel_for(0, tiles + side.n, 1, [&](int64_t b, int64_t e) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const int64_t lo = std::max(b, first[i]), hi = std::min(e, first[i + 1]);
      if (lo < hi)
        lut_row_tile_range(ps[i]->stream, ps[i]->geo, ps[i]->eng, tables[owner[i]], ys[i], lo - first[i],
                           hi - first[i]);
    }
    for (int64_t u = std::max(b, tiles); u < e; ++u) side.run(u - tiles);
  });
  for (size_t i = 0; i < ps.size(); ++i) add_bias(i, 0, ps[i]->N);
  if (rows != nullptr) rows(0, N);
}

// HF's RMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)).
void rms_norm(const float* x, const float* w, int64_t n, double eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// q * cos + rotate_half(q) * sin for `heads` consecutive vectors of d floats, in place.
void rotary(float* q, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t h2 = d / 2;
  thread_local std::vector<float> t;
  t.resize(static_cast<size_t>(d));
  for (int64_t h = 0; h < heads; ++h) {
    float* v = q + h * d;
    for (int64_t i = 0; i < h2; ++i) t[i] = v[i] * cos[i] - v[i + h2] * sin[i];
    for (int64_t i = h2; i < d; ++i) t[i] = v[i] * cos[i] + v[i - h2] * sin[i];
    std::memcpy(v, t.data(), sizeof(float) * d);
  }
}

#define HFE_INLINE inline __attribute__((always_inline))

// b: float, or at::Half (a float16 KV cache), read as float
template <class E>
HFE_INLINE float dot(const float* a, const E* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * static_cast<float>(b[i + j]);
  for (int j = 0; j < 8; ++j) acc[j] += acc[j + 8];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// exp(x) for x <= 0 (softmax after subtracting the max), Cephes' expf polynomial (about 1 ulp), written so that
// the compiler vectorizes a loop of it; x below -87.3 gives ~1e-38 instead of 0 (the caller zeroes -inf).
HFE_INLINE float exp_nonpos(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

// One head's one-query attention: out[0..d) = softmax(q.k_t * sc + mask_t) @ v; s: scratch of S floats. The
// keys and values are float or at::Half (a float16 cache; the arithmetic is float32 either way).
template <class E>
HFE_INLINE void attend_head_body(const float* qh, const E* kh, int64_t kst, const E* vh, int64_t vst,
                                 int64_t S, int64_t d, float sc, const bool* mb, const float* mf, float* s,
                                 float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float mx = kNegInf;
  for (int64_t t = 0; t < S; ++t) {
    float v = dot(qh, kh + t * kst, d) * sc;
    if (mb != nullptr && !mb[t]) v = kNegInf;
    if (mf != nullptr) v += mf[t];
    s[t] = v;
    mx = std::max(mx, v);
  }
  for (int64_t t = 0; t < S; ++t) {
    const float e = exp_nonpos(s[t] - mx);
    s[t] = s[t] == kNegInf ? 0.0f : e;
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < S; ++t) sum += s[t];
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  for (int64_t t = 0; t < S; ++t) {
    const float p = s[t] * inv;
    const E* vt = vh + t * vst;
    for (int64_t i = 0; i < d; ++i) out[i] += p * static_cast<float>(vt[i]);
  }
}

// The attention of nh query heads that read the same kv head (GQA), each as attend_head_body: q and out hold the nh
// heads' rows d apart, s is scratch of nh * S floats. One call reads each key and value row once for all nh heads
// (per head, a long cache's rows would come from DRAM once and from L2 nh - 1 more times).
template <class E>
using AttendFn = void (*)(const float* q, int nh, const E* kh, int64_t kst, const E* vh, int64_t vst, int64_t S,
                          int64_t d, float sc, const bool* mb, const float* mf, float* s, float* out);
constexpr int kMaxGroup = 4;  // heads per call: the AVX2 value pass keeps 2 accumulators per head in registers

template <class E>
void attend_generic(const float* q, int nh, const E* kh, int64_t kst, const E* vh, int64_t vst, int64_t S, int64_t d,
                    float sc, const bool* mb, const float* mf, float* s, float* out) {
  for (int j = 0; j < nh; ++j) attend_head_body(q + j * d, kh, kst, vh, vst, S, d, sc, mb, mf, s + j * S, out + j * d);
}

// Heads [h0, h1) of one query, rep query heads per kv head: runs of heads that share a kv head, at most kMaxGroup
// a call, go to group(first head, count).
template <class F>
void for_head_groups(int64_t h0, int64_t h1, int64_t rep, F&& group) {
  for (int64_t h = h0; h < h1;) {
    const int64_t e = std::min({h1, (h / rep + 1) * rep, h + kMaxGroup});
    group(h, static_cast<int>(e - h));
    h = e;
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define HFE_AVX2 __attribute__((target("avx2,fma")))

HFE_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// The attention's loads of float16 keys and values convert with F16C (every AVX2 CPU has it; attend_fn checks).
#define HFE_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
HFE_AVX2_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
HFE_AVX2_F16C inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

HFE_AVX2 inline __m256 lo_plus_hi(__m256 a, __m256 b) {  // [a's 4 lane sums lo + hi | b's]
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The hsum8 of each of s[0..8), in order, in one vector: hsum8 adds lo + hi, then (x0 + x2) + (x1 + x3).
HFE_AVX2 inline __m256 hsum8x8(const __m256* s) {
  __m256 p[4];
  for (int r = 0; r < 4; ++r)  // [x0, x2, x1, x3] of rows 2r and 2r + 1 (the 0xD8 shuffle)
    p[r] = _mm256_permute_ps(lo_plus_hi(s[2 * r], s[2 * r + 1]), 0xD8);
  // lanes [s0, s2, s4, s6 | s1, s3, s5, s7]
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// q . k over d (a multiple of 8): 16-float steps into two accumulators, an 8-float tail into the first.
template <class E>
HFE_AVX2_F16C HFE_INLINE __m256 q_dot_row(const float* q, const E* k, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  if (i < d) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  return _mm256_add_ps(a0, a1);
}

// exp_nonpos on 8 lanes (same polynomial, fused multiply-adds).
HFE_AVX2 inline __m256 exp_nonpos8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Software prefetch of the cache rows the attention reads kPrefetchRows rows later: the lines of n elements of
// `rows` rows, `stride` apart (prefetches never fault, also past the end), because the hardware prefetcher alone
// left the cache's reads well below the float GEMV's rate (docs/lut.md, round 10).
constexpr int kPrefetchRows = 16;
template <class E>
HFE_INLINE void prefetch_rows(const E* p, int rows, int64_t stride, int64_t n) {
  for (int r = 0; r < rows; ++r)
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(E)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + r * stride) + b, _MM_HINT_T0);
}

// out[j][i0, i0 + 8 W) = sum_t p_j[t] v_t[i0, i0 + 8 W) for the NH heads, accumulated in registers in t order.
template <int NH, int W, class E>
HFE_AVX2_F16C HFE_INLINE void value_pass(const float* p, int64_t S, const E* vh, int64_t vst, int64_t i0, int64_t d,
                                         float* out) {
  __m256 a[NH][W];
  for (int j = 0; j < NH; ++j)
    for (int c = 0; c < W; ++c) a[j][c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < S; ++t) {
    const E* vt = vh + t * vst + i0;
    prefetch_rows(vt + kPrefetchRows * vst, 1, vst, 8 * W);
    __m256 v[W];
    for (int c = 0; c < W; ++c) v[c] = load8(vt + 8 * c);
    for (int j = 0; j < NH; ++j) {
      const __m256 pj = _mm256_broadcast_ss(p + j * S + t);
      for (int c = 0; c < W; ++c) a[j][c] = _mm256_fmadd_ps(pj, v[c], a[j][c]);
    }
  }
  for (int j = 0; j < NH; ++j)
    for (int c = 0; c < W; ++c) _mm256_storeu_ps(out + j * d + i0 + 8 * c, a[j][c]);
}

// attend_generic with AVX2 + FMA for head_dim a multiple of 8, 8 keys at a time. Each score is q_dot_row's vector
// reduced in hsum8's order, as the per-head AVX2 kernel before this one summed it (the same floats); scores can
// differ from the generic body's in the last bits.
template <int NH, class E>
HFE_AVX2_F16C void attend_group_avx2(const float* q, const E* kh, int64_t kst, const E* vh, int64_t vst, int64_t S,
                                     int64_t d, float sc, const bool* mb, const float* mf, float* s, float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(kNegInf), vsc = _mm256_set1_ps(sc);
  __m256 vmx[NH];
  for (int j = 0; j < NH; ++j) vmx[j] = vninf;
  int64_t t = 0;
  for (; t + 8 <= S; t += 8) {
    const E* k0 = kh + t * kst;
    prefetch_rows(k0 + kPrefetchRows * kst, 8, kst, d);
    __m256 off = _mm256_setzero_ps();  // lanes the bool mask drops
    if (mb != nullptr) {
      int64_t bytes;
      std::memcpy(&bytes, mb + t, sizeof(bytes));
      const __m256i m = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      off = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, _mm256_setzero_si256()));
    }
    for (int j = 0; j < NH; ++j) {  // the 8 key rows stay in L1 across the heads
      const float* qj = q + j * d;
      __m256 a[8];
      for (int r = 0; r < 8; ++r) a[r] = q_dot_row(qj, k0 + r * kst, d);
      __m256 v = _mm256_blendv_ps(_mm256_mul_ps(hsum8x8(a), vsc), vninf, off);
      if (mf != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(mf + t));
      _mm256_storeu_ps(s + j * S + t, v);
      vmx[j] = _mm256_max_ps(vmx[j], v);
    }
  }
  float mx[NH];
  for (int j = 0; j < NH; ++j) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmx[j]), _mm256_extractf128_ps(vmx[j], 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    mx[j] = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  for (; t < S; ++t)
    for (int j = 0; j < NH; ++j) {
      float v = hsum8(q_dot_row(q + j * d, kh + t * kst, d)) * sc;
      if (mb != nullptr && !mb[t]) v = kNegInf;
      if (mf != nullptr) v += mf[t];
      s[j * S + t] = v;
      mx[j] = std::max(mx[j], v);
    }
  for (int j = 0; j < NH; ++j) {  // s_j <- softmax probabilities
    float* sj = s + j * S;
    const __m256 m = _mm256_set1_ps(mx[j]);
    __m256 vsum = _mm256_setzero_ps();
    int64_t u = 0;
    for (; u + 8 <= S; u += 8) {
      const __m256 x = _mm256_loadu_ps(sj + u);
      const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, vninf, _CMP_EQ_OQ), exp_nonpos8(_mm256_sub_ps(x, m)));
      _mm256_storeu_ps(sj + u, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    for (; u < S; ++u) {
      sj[u] = sj[u] == kNegInf ? 0.0f : exp_nonpos(sj[u] - mx[j]);
      sum += sj[u];
    }
    const float inv = 1.0f / sum;
    for (u = 0; u < S; ++u) sj[u] *= inv;
  }
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) value_pass<NH, 2>(s, S, vh, vst, i, d, out);
  if (i < d) value_pass<NH, 1>(s, S, vh, vst, i, d, out);
}

template <class E>
HFE_AVX2_F16C void attend_avx2(const float* q, int nh, const E* kh, int64_t kst, const E* vh, int64_t vst, int64_t S,
                               int64_t d, float sc, const bool* mb, const float* mf, float* s, float* out) {
  if (d % 8 != 0) return attend_generic(q, nh, kh, kst, vh, vst, S, d, sc, mb, mf, s, out);
  switch (nh) {
    case 1: return attend_group_avx2<1>(q, kh, kst, vh, vst, S, d, sc, mb, mf, s, out);
    case 2: return attend_group_avx2<2>(q, kh, kst, vh, vst, S, d, sc, mb, mf, s, out);
    case 3: return attend_group_avx2<3>(q, kh, kst, vh, vst, S, d, sc, mb, mf, s, out);
    default: TORCH_CHECK(nh == kMaxGroup, "attention group of ", nh, " heads");
             return attend_group_avx2<kMaxGroup>(q, kh, kst, vh, vst, S, d, sc, mb, mf, s, out);
  }
}
#endif

// The attention over E keys and values for an ISA cap (as float_rows: kAvx2 and up only on a CPU that has them).
template <class E>
AttendFn<E> attend_fn(Isa cap) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool fma_f16c = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (cap >= Isa::kAvx2 && fma_f16c) return &attend_avx2<E>;
#endif
  return &attend_generic<E>;
}

// Float projections: y = W x over a row-major (N, K) weight, rows split over the threads. torch's mv (MKL's
// sgemv) reads decode-sized weights below the memory bandwidth on one core and gains nothing from a second
// thread on the 2-core EPYC (measured, docs/lut.md).
void gemv_rows_generic(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, float* y) {
  for (int64_t n = n0; n < n1; ++n) y[n] = dot(w + n * K, x, K);
}

#if defined(__x86_64__) || defined(__i386__)
// One row at a time, four 8-wide accumulators: the chunk is read as one sequential stream, which the hardware
// prefetcher follows best (several rows interleaved, or software prefetch, read slower in a benchmark here).
HFE_AVX2 void gemv_rows_avx2(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, float* y) {
  const int64_t K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int64_t k = K32; k < K; ++k) s += r[k] * x[k];
    y[n] = s;
  }
}
#endif

#if defined(__x86_64__) || defined(__i386__)
#define HFE_AVX512F __attribute__((target("avx512f,avx2,fma")))
// The same with 16-wide vectors, because on an AVX-512 CPU ggml's 16-wide F32 GEMV read the same weights faster
// than the 8-wide loop above (docs/lut.md, round 8). The tail is one masked step (masked lanes load nothing and
// fault on nothing). One software prefetch per 256 bytes, 1 KiB ahead, because without it the loop stayed well
// below a plain read loop's DRAM rate on the Sapphire Rapids Xeon (a 256-byte distance did nothing; AVX-512 EPYCs
// not measured). Past the end of the weight it is harmless: prefetches never fault.
HFE_AVX512F void gemv_rows_avx512(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, float* y) {
  const int64_t K64 = K - K % 64, K16 = K - K % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K64; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(r + k) + 1024, _MM_HINT_T0);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (int64_t k = K64; k < K16; k += 16)
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
    if (tail != 0)
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + K16), _mm512_maskz_loadu_ps(tail, x + K16), a1);
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
}
#endif

// The float GEMV for an ISA cap (lut_isa_cap: the CPU's best, or lower by HF_EFFICIENT_LUT_ISA/_SCALAR; kAvx512
// and kAvx2 are only ever the cap on a CPU that has them).
RowsFn float_rows(Isa cap) {
#if defined(__x86_64__) || defined(__i386__)
  if (cap == Isa::kAvx512) return &gemv_rows_avx512;
  if (cap == Isa::kAvx2) return &gemv_rows_avx2;
#endif
  return &gemv_rows_generic;
}

void gemv_f32(const Proj& p, const float* x, float* y) {
  // chunks of at least ~64 KiB of weights, so that small projections stay on one thread
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 14) / std::max<int64_t>(p.K, 1));
  const float* w = p.weight.data_ptr<float>();  // contiguous (project() checks)
  at::parallel_for(0, p.N, grain, [&](int64_t b, int64_t e) { p.rows(w, p.K, b, e, x, y); });
}

at::Tensor as_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

// The inputs every one-token attention step checks alike: x one float32 row of H features, the head geometry and
// one position's cos/sin (returned contiguous, x as xc).
struct RowInputs {
  at::Tensor xc, cos, sin;
  int64_t H = 0;
};
RowInputs check_row_inputs(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  RowInputs r;
  r.xc = as_cpu_float(op, "x", x);
  r.H = r.xc.size(-1);
  TORCH_CHECK(r.xc.numel() == r.H, op, ": x must hold one row (batch 1, one query), got shape ", x.sizes());
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0 && num_heads > 0 && num_kv_heads > 0, op, ": bad head geometry");
  r.cos = as_cpu_float(op, "cos", cos), r.sin = as_cpu_float(op, "sin", sin);
  TORCH_CHECK(r.cos.numel() == head_dim && r.sin.numel() == head_dim, op, ": cos/sin must hold one position's ",
              head_dim, " values, got ", cos.sizes(), " and ", sin.sizes());
  return r;
}

// A norm weight of H values, contiguous.
at::Tensor check_norm(const char* op, const at::Tensor& w, int64_t H) {
  at::Tensor wc = as_cpu_float(op, "norm_weight", w);
  TORCH_CHECK(wc.numel() == H, op, ": norm_weight has ", wc.numel(), " values, x has ", H, " features");
  return wc;
}

// q/k/v projections (ps[0..3)) of a layer with hidden size H, q width qn and k/v width kvn.
void check_attn_in_projs(const char* op, const Proj* ps, int64_t H, int64_t qn, int64_t kvn) {
  const int64_t want[3] = {qn, kvn, kvn};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(ps[i].K == H && ps[i].N == want[i], op, ": projection ", i, " is ", ps[i].N, "x", ps[i].K,
                ", expected ", want[i], "x", H);
}

// o, gate, up, down projections (ps[0..4)) of a layer with hidden size H and attention width qn.
void check_mlp_projs(const char* op, const Proj* ps, int64_t H, int64_t qn) {
  const int64_t I = ps[1].N;
  TORCH_CHECK(ps[0].K == qn && ps[0].N == H && ps[1].K == H && ps[2].K == H && ps[2].N == I && ps[3].K == I &&
                  ps[3].N == H,
              op, ": projection shapes do not fit (o ", ps[0].N, "x", ps[0].K, ", gate ", ps[1].N, "x", ps[1].K,
              ", up ", ps[2].N, "x", ps[2].K, ", down ", ps[3].N, "x", ps[3].K, ") with hidden ", H, ", heads*d ",
              qn);
}

// SiLU(gate) * up on rows [n0, n1), into g.
void silu_mul(float* g, const float* u, int64_t n0, int64_t n1) {
  for (int64_t i = n0; i < n1; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// decode_attn_in on parsed projections ps[0..3) (q, k, v), into q, k, v (allocated here where undefined).
void attn_in(const char* op, const at::Tensor& x, const at::Tensor& norm_weight, double eps, Proj* ps,
             const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
             at::Tensor& q, at::Tensor& k, at::Tensor& v, const SideWork& side = SideWork()) {
  const RowInputs in = check_row_inputs(op, x, cos, sin, num_heads, num_kv_heads, head_dim);
  const at::Tensor &xc = in.xc, &cc = in.cos, &sc = in.sin;
  const int64_t H = in.H;
  const at::Tensor wn = check_norm(op, norm_weight, H);
  check_attn_in_projs(op, ps, H, num_heads * head_dim, num_kv_heads * head_dim);

  thread_local std::vector<float> h;  // per-thread scratch, reused (no heap traffic per layer)
  h.resize(static_cast<size_t>(H));
  rms_norm(xc.data_ptr<float>(), wn.data_ptr<float>(), H, eps, h.data());
  if (!q.defined()) q = at::empty({1, num_heads, 1, head_dim}, xc.options());
  if (!k.defined()) k = at::empty({1, num_kv_heads, 1, head_dim}, xc.options());
  if (!v.defined()) v = at::empty({1, num_kv_heads, 1, head_dim}, xc.options());
  project({&ps[0], &ps[1], &ps[2]}, h.data(), {q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>()},
          nullptr, side);
  rotary(q.data_ptr<float>(), num_heads, head_dim, cc.data_ptr<float>(), sc.data_ptr<float>());
  rotary(k.data_ptr<float>(), num_kv_heads, head_dim, cc.data_ptr<float>(), sc.data_ptr<float>());
}

// decode_attn_out_mlp on parsed projections ps[0..4) (o, gate, up, down), into y (allocated here if undefined;
// never residual's storage).
at::Tensor attn_out_mlp(const char* op, const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& v_all,
                        const c10::optional<at::Tensor>& mask, double scaling, const at::Tensor& residual,
                        const at::Tensor& norm_weight, double eps, Proj* ps, at::Tensor y = at::Tensor()) {
  const at::Tensor qc = as_cpu_float(op, "q", q), xc = as_cpu_float(op, "residual", residual);
  const at::Tensor wn = as_cpu_float(op, "norm_weight", norm_weight);
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, op, ": q must be (1, heads, 1, head_dim), got ",
              q.sizes());
  TORCH_CHECK(k_all.dim() == 4 && v_all.dim() == 4 && k_all.size(0) == 1 && k_all.sizes() == v_all.sizes(), op,
              ": k and v must be (1, kv_heads, kv_len, head_dim) alike, got ", k_all.sizes(), " and ", v_all.sizes());
  const at::ScalarType kvt = k_all.scalar_type();
  TORCH_CHECK(k_all.device().is_cpu() && v_all.device().is_cpu() && v_all.scalar_type() == kvt &&
                  (kvt == at::kFloat || kvt == at::kHalf),
              op, ": k and v must be float32 or float16 CPU tensors alike, got ", kvt, " and ", v_all.scalar_type());
  const int64_t heads = q.size(1), d = q.size(3), kvh = k_all.size(1), S = k_all.size(2);
  TORCH_CHECK(k_all.size(3) == d && kvh > 0 && heads % kvh == 0, op, ": q has ", heads, " heads of ", d,
              ", k ", kvh, " heads of ", k_all.size(3));
  const at::Tensor kc = k_all.stride(3) == 1 ? k_all : k_all.contiguous();
  const at::Tensor vc = v_all.stride(3) == 1 ? v_all : v_all.contiguous();
  const int64_t H = xc.numel();
  TORCH_CHECK(wn.numel() == H, op, ": norm_weight has ", wn.numel(), " values, residual ", H);
  at::Tensor mk;
  if (mask.has_value()) {
    mk = mask->contiguous();
    TORCH_CHECK(mk.device().is_cpu() && mk.numel() == S && (mk.scalar_type() == at::kBool ||
                                                            mk.scalar_type() == at::kFloat),
                op, ": mask must be bool or float32 with kv_len = ", S, " values, got ", mk.scalar_type(), " ",
                mk.sizes());
  }
  check_mlp_projs(op, ps, H, heads * d);
  const int64_t I = ps[1].N;

  // Attention, one query per head.
  // per-thread scratch, reused (no heap traffic per layer); every element is written before it is read
  // (the attention lambda runs on other threads too: it writes through pa, not the thread_local's name)
  thread_local std::vector<float> a, o, n, g, u;
  a.resize(static_cast<size_t>(heads * d));
  float* pa = a.data();
  const float* pq = qc.data_ptr<float>();
  const int64_t ksh = kc.stride(1), kst = kc.stride(2), vsh = vc.stride(1), vst = vc.stride(2);
  const bool* mb = mk.defined() && mk.scalar_type() == at::kBool ? mk.data_ptr<bool>() : nullptr;
  const float* mf = mk.defined() && mk.scalar_type() == at::kFloat ? mk.data_ptr<float>() : nullptr;
  const int64_t rep = heads / kvh;
  const float sc = static_cast<float>(scaling);
  const int64_t grain = S * d * heads < (int64_t(1) << 16) ? heads : 1;
  const Isa cap = lut_isa_cap();
  auto attention = [&](auto* pk, auto* pv) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(pk)>>;
    const AttendFn<E> attend = attend_fn<E>(cap);
    at::parallel_for(0, heads, grain, [&](int64_t hb, int64_t he) {
      thread_local std::vector<float> s;
      s.resize(static_cast<size_t>(kMaxGroup * S));
      for_head_groups(hb, he, rep, [&](int64_t h, int nh) {
        attend(pq + h * d, nh, pk + (h / rep) * ksh, kst, pv + (h / rep) * vsh, vst, S, d, sc, mb, mf, s.data(),
               pa + h * d);
      });
    });
  };
  if (kvt == at::kHalf)
    attention(kc.data_ptr<at::Half>(), vc.data_ptr<at::Half>());
  else
    attention(kc.data_ptr<float>(), vc.data_ptr<float>());

  if (!y.defined()) y = at::empty_like(xc);
  float* py = y.data_ptr<float>();
  const float* px = xc.data_ptr<float>();
  o.resize(static_cast<size_t>(H));
  n.resize(static_cast<size_t>(H));
  project({&ps[0]}, a.data(), {o.data()});
  for (int64_t i = 0; i < H; ++i) py[i] = px[i] + o[i];
  rms_norm(py, wn.data_ptr<float>(), H, eps, n.data());
  g.resize(static_cast<size_t>(I));
  u.resize(static_cast<size_t>(I));
  float *pg = g.data(), *pu = u.data();  // (the rows callback may run on other threads: no thread_local names)
  project({&ps[1], &ps[2]}, n.data(), {pg, pu}, [pg, pu](int64_t n0, int64_t n1) { silu_mul(pg, pu, n0, n1); });
  project({&ps[3]}, g.data(), {o.data()});
  for (int64_t i = 0; i < H; ++i) py[i] += o[i];
  return y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attn_in(
    const at::Tensor& x, const at::Tensor& norm_weight, double eps, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& grids, const c10::List<c10::optional<at::Tensor>>& biases,
    at::IntArrayRef meta, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim) {
  const char* op = "decode_attn_in";
  std::vector<Proj> ps = parse_projs(op, weights, grids, biases, meta, 3);
  at::Tensor q, k, v;
  attn_in(op, x, norm_weight, eps, ps.data(), cos, sin, num_heads, num_kv_heads, head_dim, q, k, v);
  return {q, k, v};
}

at::Tensor decode_attn_out_mlp(const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& v_all,
                               const c10::optional<at::Tensor>& mask, double scaling, const at::Tensor& residual,
                               const at::Tensor& norm_weight, double eps, at::TensorList weights,
                               const c10::List<c10::optional<at::Tensor>>& grids,
                               const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef meta) {
  const char* op = "decode_attn_out_mlp";
  std::vector<Proj> ps = parse_projs(op, weights, grids, biases, meta, 4);
  return attn_out_mlp(op, q, k_all, v_all, mask, scaling, residual, norm_weight, eps, ps.data());
}

namespace {

// One cache layer's append of this token's row, in one of two modes:
// * copy: torch.cat({past, kv}, -2) for a contiguous float32 past (1, heads, S, d) and kv (1, heads, 1, d) by plain
//   copies (the same values and a contiguous result, as cat gives, without its dispatch per call), in two halves:
//   the copies of the past (per head, units of a SideWork: they need nothing of this token) and then the new rows.
// * in place: the past is rows [0, S) of a buffer (1, heads, capacity > S, d) that the caller keeps; the new row
//   goes to row S and the result is the view of rows [0, S] (made by finish() only: the one-region path returns
//   no caches, and the caller makes its own views). No copy of the past, which in copy mode costs two copies per
//   layer and token, growing with the cache (docs/lut.md, round 9).
struct Append {
  at::Tensor past, out;  // copy mode: out undefined -> at::cat after the layer's attn_in
  const float* src = nullptr;  // past's values
  float* dst = nullptr;        // out's values (in place: the buffer's)
  at::Tensor half;             // in place: the buffer's float16 copy, which the attention reads instead (or none)
  at::Half* hdst = nullptr;    // its values, rows as in dst
  int64_t heads = 0, S = 0, d = 0, hs = 0;  // hs: floats from one head's rows to the next in dst
  bool in_place = false;
  bool ok = false;  // the append needs no at::cat: a contiguous float32 past or a buffer with a free row

  explicit Append(const at::Tensor& p) : past(p) {
    if (p.dim() != 4 || p.scalar_type() != at::kFloat || !p.is_contiguous() || p.size(0) != 1 || !p.device().is_cpu())
      return;
    heads = p.size(1), S = p.size(2), d = p.size(3), hs = (S + 1) * d;
    out = at::empty({1, heads, S + 1, d}, p.options());
    src = p.data_ptr<float>(), dst = out.data_ptr<float>();
    ok = true;
  }
  // in place; half_copy: undefined, or a float16 tensor of the buffer's shape (contiguous, CPU; else not ok)
  Append(const at::Tensor& buffer, const at::Tensor& half_copy, int64_t past_len)
      : past(buffer), half(half_copy), in_place(true) {
    const at::Tensor& b = buffer;
    if (b.dim() != 4 || b.scalar_type() != at::kFloat || !b.is_contiguous() || b.size(0) != 1 || !b.device().is_cpu() ||
        past_len < 0 || b.size(2) <= past_len)
      return;
    if (half.defined()) {
      if (half.scalar_type() != at::kHalf || !half.is_contiguous() || !half.device().is_cpu() ||
          half.sizes() != b.sizes())
        return;
      hdst = half.data_ptr<at::Half>();
    }
    heads = b.size(1), S = past_len, d = b.size(3), hs = b.size(2) * d;
    dst = b.data_ptr<float>();
    ok = true;
  }
  // the attention's keys or values: rows [0, S] of the float16 copy where there is one, else of dst
  at::Tensor attended(const at::Tensor& rows) const { return hdst != nullptr ? half.narrow(2, 0, S + 1) : rows; }
  void copy_past(int64_t hh) const {
    if (!in_place) std::memcpy(dst + hh * hs, src + hh * S * d, sizeof(float) * S * d);
  }
  // head hh's new row: this token's d values
  void put_row(int64_t hh, const float* row) const {
    std::memcpy(dst + hh * hs + S * d, row, sizeof(float) * d);
    if (hdst != nullptr)
      for (int64_t i = 0; i < d; ++i) hdst[hh * hs + S * d + i] = static_cast<at::Half>(row[i]);
  }
  // the result, given this token's kv (1, heads, 1, d)
  at::Tensor finish(const at::Tensor& kv) const {
    const bool fits = ok && kv.dim() == 4 && kv.scalar_type() == at::kFloat && kv.is_contiguous() &&
                      kv.size(0) == 1 && kv.size(1) == heads && kv.size(2) == 1 && kv.size(3) == d;
    if (!fits) {
      TORCH_CHECK(!in_place, "decode_layers_inplace: this token's keys/values ", kv.sizes(), " do not fit a buffer of ",
                  heads, " heads of ", d);
      return at::cat({past, kv}, -2);
    }
    const float* pk = kv.data_ptr<float>();
    for (int64_t hh = 0; hh < heads; ++hh) put_row(hh, pk + hh * d);
    return in_place ? past.narrow(2, 0, S + 1) : out;
  }
};


// Rows of a projection in units of kTileN: a LUT tile, or as many rows of a float weight.
int64_t row_units(const Proj& p) { return (p.N + kTileN - 1) / kTileN; }

// Units [u0, u1) of y = W x (+ bias) on the calling thread: LUT projections from their row tables t, float ones
// on their contiguous weight (the same per-row operations as project()).
void project_units(const Proj& p, const RowTables& t, const float* x, float* y, int64_t u0, int64_t u1) {
  const int64_t n0 = u0 * kTileN, n1 = std::min(p.N, u1 * kTileN);
  if (p.is_lut)
    lut_row_tile_range(p.stream, p.geo, p.eng, t, y, u0, u1);
  else
    p.rows(p.fw, p.K, n0, n1, x, y);
  if (p.bias != nullptr)
    for (int64_t n = n0; n < n1; ++n) y[n] += p.bias[n];
}

// decode_layers as phases of one parallel region (run_team): each phase is split over the threads and ends at a
// barrier, so that the table builds (by weight group), rotary and the cache's new rows (by head), the attention
// (by query head), the residual and norms (each thread its own copy, ~1 us) no longer run on the main thread
// while the others wait, and a token costs one fork/join instead of four or five per layer. The per-element
// operations are those of attn_in, Append and attn_out_mlp, so the results equal the per-layer loop's bit for
// bit at any thread count (tested).
struct LayerTeam {
  // per call, set by decode_layers_team
  const Proj* ps = nullptr;  // 7 per layer: q, k, v, o, gate, up, down
  const float *x = nullptr, *cos = nullptr, *sin = nullptr, *mf = nullptr;
  const bool* mb = nullptr;
  std::vector<const float*> norms;  // 2 norm weights per layer
  std::vector<double> eps;
  std::vector<Append> app;  // 2 per layer: keys, values (1, kvh, S, d) -> (1, kvh, S + 1, d), by copy or in place
  std::vector<int> owner;      // 7 per layer: the projection whose tables a LUT projection reads
  std::vector<std::vector<float>> coeffs;  // 7 per layer: table coefficients of the owners
  float* hb[2] = {nullptr, nullptr};       // layer l writes its output to hb[l % 2]
  float sc = 0.0f;
  AttendFn<float> attend = nullptr;  // for the call's ISA cap, over float32 caches
  AttendFn<at::Half> attend16 = nullptr;  // over float16 copies
  int64_t H = 0, I = 0, heads = 0, kvh = 0, d = 0;
  // shared scratch, kept between calls
  std::vector<float> q, k, v, a, o, g, u, dn;
  RowTables tabs[7];  // tables built by projection j of the current layer

  // Builds the tables of the owners among projections [j0, j1) of layer l from x, the parts split over the team.
  // (Each thread building whole tables into its own, with no barrier before the tiles, was slower at 2 threads
  // in an in-process A/B: docs/lut.md, round 7.)
  void build(size_t l, int j0, int j1, const float* xin, int tid, int nt) {
    const Proj* p = ps + 7 * l;
    const int* own = owner.data() + 7 * l;
    int64_t n = 0;
    for (int j = j0; j < j1; ++j) n += own[j] == j ? lut_table_parts(p[j].geo) : 0;
    const auto r = team_range(n, tid, nt);
    int64_t base = 0;
    for (int j = j0; j < j1; ++j) {
      if (own[j] != j) continue;
      const int64_t np = lut_table_parts(p[j].geo), lo = std::max(r.first, base), hi = std::min(r.second, base + np);
      if (lo < hi) lut_row_tables_part(xin, p[j].geo, coeffs[7 * l + j].data(), p[j].eng, &tabs[j], lo - base, hi - base);
      base += np;
    }
  }

  // Units of projections [j0, j1) of layer l (y: their outputs), then `extra` more units of side(u).
  template <class Side>
  void units(size_t l, int j0, int j1, const float* xin, float* const* ys, int64_t extra, const Side& side, int tid,
             int nt) {
    const Proj* p = ps + 7 * l;
    const int* own = owner.data() + 7 * l;
    int64_t n = extra;
    for (int j = j0; j < j1; ++j) n += row_units(p[j]);
    const auto r = team_range(n, tid, nt);
    int64_t base = 0;
    for (int j = j0; j < j1; ++j) {
      const int64_t nu = row_units(p[j]), lo = std::max(r.first, base), hi = std::min(r.second, base + nu);
      if (lo < hi) project_units(p[j], tabs[std::max(own[j], 0)], xin, ys[j - j0], lo - base, hi - base);
      base += nu;
    }
    for (int64_t e = std::max(r.first, base); e < r.second; ++e) side(e - base);
  }

  void layer(size_t l, int tid, int nt, float* hn, float* res, float* s) {
    const Proj* p = ps + 7 * l;
    const float* hin = l == 0 ? x : hb[(l - 1) % 2];
    float* hout = hb[l % 2];
    const Append &ak = app[2 * l], &av = app[2 * l + 1];
    const int64_t S1 = ak.S + 1, rep = heads / kvh;
    const int64_t side = ak.in_place ? 0 : 2 * kvh;  // copies of the past
    rms_norm(hin, norms[2 * l], H, eps[2 * l], hn);
    build(l, 0, 3, hn, tid, nt);
    team_barrier();
    // q/k/v, and the copies of the past into the new caches (they need nothing of this token)
    float* const qkv[3] = {q.data(), k.data(), v.data()};
    units(l, 0, 3, hn, qkv, side, [&](int64_t c) { c < kvh ? ak.copy_past(c) : av.copy_past(c - kvh); }, tid, nt);
    team_barrier();
    // rotary of the query heads and of the key heads, which then go to the caches' last row with the values
    auto r = team_range(heads + kvh, tid, nt);
    for (int64_t i = r.first; i < r.second; ++i) {
      if (i < heads) {
        rotary(q.data() + i * d, 1, d, cos, sin);
        continue;
      }
      const int64_t hh = i - heads;
      rotary(k.data() + hh * d, 1, d, cos, sin);
      ak.put_row(hh, k.data() + hh * d);
      av.put_row(hh, v.data() + hh * d);
    }
    team_barrier();
    r = team_range(heads, tid, nt);
    for_head_groups(r.first, r.second, rep, [&](int64_t h, int nh) {
      const int64_t ko = (h / rep) * ak.hs, vo = (h / rep) * av.hs;
      if (ak.hdst != nullptr)
        attend16(q.data() + h * d, nh, ak.hdst + ko, d, av.hdst + vo, d, S1, d, sc, mb, mf, s, a.data() + h * d);
      else
        attend(q.data() + h * d, nh, ak.dst + ko, d, av.dst + vo, d, S1, d, sc, mb, mf, s, a.data() + h * d);
    });
    team_barrier();
    build(l, 3, 4, a.data(), tid, nt);
    team_barrier();
    float* const po = o.data();
    units(l, 3, 4, a.data(), &po, 0, [](int64_t) {}, tid, nt);
    team_barrier();
    for (int64_t i = 0; i < H; ++i) res[i] = hin[i] + o[i];
    rms_norm(res, norms[2 * l + 1], H, eps[2 * l + 1], hn);
    build(l, 4, 6, hn, tid, nt);
    team_barrier();
    // gate and up of the same rows on one thread, then SiLU(gate) * up on those rows (in L1)
    r = team_range(row_units(p[4]), tid, nt);
    const int* own = owner.data() + 7 * l;
    for (int64_t t = r.first; t < r.second; ++t) {
      project_units(p[4], tabs[std::max(own[4], 0)], hn, g.data(), t, t + 1);
      project_units(p[5], tabs[std::max(own[5], 0)], hn, u.data(), t, t + 1);
      silu_mul(g.data(), u.data(), t * kTileN, std::min(I, (t + 1) * kTileN));
    }
    team_barrier();
    build(l, 6, 7, g.data(), tid, nt);
    team_barrier();
    r = team_range(row_units(p[6]), tid, nt);
    project_units(p[6], tabs[std::max(own[6], 0)], g.data(), dn.data(), r.first, r.second);
    for (int64_t i = r.first * kTileN; i < std::min(H, r.second * kTileN); ++i) hout[i] = res[i] + dn[i];
    team_barrier();
  }
};

// Whether decode_layers can run as a LayerTeam: appends that need no at::cat (contiguous float32 (1, kv_heads, S, d)
// pasts or in-place buffers, keys and values alike), contiguous float weights, a mask of each layer's length + 1;
// anything else takes the per-layer loop.
bool team_fits(const std::vector<Proj>& ps, const c10::optional<at::Tensor>& mask, int64_t num_heads,
               int64_t num_kv_heads, int64_t head_dim, const std::vector<Append>& app) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0) return false;
  for (const Proj& p : ps)
    if (!p.is_lut && p.fw == nullptr) return false;
  for (size_t l = 0; l < app.size(); l += 2) {
    const Append &k = app[l], &v = app[l + 1];
    if (!k.ok || !v.ok || k.heads != num_kv_heads || k.d != head_dim || v.heads != k.heads ||
        v.d != k.d || v.S != k.S)
      return false;
    if (mask.has_value() && (!mask->device().is_cpu() || mask->numel() != k.S + 1 ||
                             (mask->scalar_type() != at::kBool && mask->scalar_type() != at::kFloat)))
      return false;
  }
  return true;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> decode_layers_team(
    const char* op, const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> eps,
    const std::vector<Proj>& ps, const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& mask,
    double scaling, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, std::vector<Append>& app) {
  const size_t L = app.size() / 2;
  // every check of attn_in / attn_out_mlp before the region (nothing in it may throw)
  const RowInputs in = check_row_inputs(op, x, cos, sin, num_heads, num_kv_heads, head_dim);
  const at::Tensor &xc = in.xc, &cc = in.cos, &sn = in.sin;
  const int64_t H = in.H, d = head_dim;
  std::vector<at::Tensor> nw(2 * L), nk(L), nv(L);
  thread_local LayerTeam team;  // the calling thread's; the region reads it through tm
  LayerTeam* tm = &team;
  tm->norms.resize(2 * L);
  tm->app = std::move(app);
  tm->owner.assign(7 * L, -1);
  tm->coeffs.resize(7 * L);
  int64_t smax = 0;
  for (size_t l = 0; l < L; ++l) {
    const Proj* p = &ps[7 * l];
    check_attn_in_projs(op, p, H, num_heads * d, num_kv_heads * d);
    check_mlp_projs(op, p + 3, H, num_heads * d);
    for (int i = 0; i < 2; ++i) {
      nw[2 * l + i] = check_norm(op, norm_weights[2 * l + i], H);
      tm->norms[2 * l + i] = nw[2 * l + i].data_ptr<float>();
    }
    // the projections that read one row (q/k/v, o, gate/up, down), each group's table owners as in project()
    const int groups[4][2] = {{0, 3}, {3, 4}, {4, 6}, {6, 7}};
    for (const auto& gr : groups) {
      const Proj* g[3];
      int own[3];
      for (int j = gr[0]; j < gr[1]; ++j) g[j - gr[0]] = &p[j];
      table_owners(g, gr[1] - gr[0], own);
      for (int j = gr[0]; j < gr[1]; ++j) {
        if (own[j - gr[0]] < 0) continue;
        tm->owner[7 * l + j] = own[j - gr[0]] + gr[0];
        if (tm->owner[7 * l + j] != j) continue;
        tm->coeffs[7 * l + j] = table_coeffs(p[j].geo, p[j].grid_ptr);
        lut_row_tables_size(p[j].geo, &tm->tabs[j]);
      }
    }
    nk[l] = tm->app[2 * l].out, nv[l] = tm->app[2 * l + 1].out;  // copy mode: defined (team_fits); in place: none
    smax = std::max(smax, tm->app[2 * l].S + 1);
  }
  at::Tensor mk = mask.has_value() ? mask->contiguous() : at::Tensor();
  tm->mb = mk.defined() && mk.scalar_type() == at::kBool ? mk.data_ptr<bool>() : nullptr;
  tm->mf = mk.defined() && mk.scalar_type() == at::kFloat ? mk.data_ptr<float>() : nullptr;
  tm->eps.assign(eps.begin(), eps.end());
  tm->ps = ps.data();
  tm->x = xc.data_ptr<float>(), tm->cos = cc.data_ptr<float>(), tm->sin = sn.data_ptr<float>();
  tm->sc = static_cast<float>(scaling);
  const Isa cap = lut_isa_cap();
  tm->attend = attend_fn<float>(cap);
  tm->attend16 = attend_fn<at::Half>(cap);
  tm->H = H, tm->I = ps[4].N, tm->heads = num_heads, tm->kvh = num_kv_heads, tm->d = d;
  for (auto* b : {&tm->q, &tm->a}) b->resize(static_cast<size_t>(num_heads * d));
  for (auto* b : {&tm->k, &tm->v}) b->resize(static_cast<size_t>(num_kv_heads * d));
  for (auto* b : {&tm->o, &tm->dn}) b->resize(static_cast<size_t>(H));
  for (auto* b : {&tm->g, &tm->u}) b->resize(static_cast<size_t>(tm->I));
  at::Tensor hb[2] = {at::empty_like(xc), L > 1 ? at::empty_like(xc) : at::Tensor()};
  tm->hb[0] = hb[0].data_ptr<float>();
  tm->hb[1] = L > 1 ? hb[1].data_ptr<float>() : nullptr;
  run_team([&](int tid, int nt) {
    thread_local std::vector<float> hn, res, s;  // this thread's own
    hn.resize(static_cast<size_t>(H)), res.resize(static_cast<size_t>(H)), s.resize(static_cast<size_t>(kMaxGroup * smax));
    for (size_t l = 0; l < L; ++l) tm->layer(l, tid, nt, hn.data(), res.data(), s.data());
  });
  tm->app.clear();  // the team is kept per thread: hold no cache tensors past the call
  return {hb[(L - 1) % 2], nk, nv};
}

// decode_layers' and decode_layers_inplace's per-layer lists agree: L caches (keys / key buffers), L of values,
// 2 L norm weights and 2 L eps.
void check_layer_lists(const char* op, const char* caches, size_t L, size_t values, size_t norms, size_t eps) {
  TORCH_CHECK(L > 0 && values == L && norms == 2 * L && eps == 2 * L, op, ": expected per layer one ", caches,
              ", two norm weights and two eps, got ", L, ", ", values, ", ", norms, " and ", eps);
}

// decode_layers / decode_layers_inplace after the appends are set up (2 per layer: keys, values).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> decode_layers_appending(
    const char* op, const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> eps,
    at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& grids,
    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef meta, const at::Tensor& cos,
    const at::Tensor& sin, const c10::optional<at::Tensor>& mask, double scaling, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, std::vector<Append>& app) {
  const size_t L = app.size() / 2;
  std::vector<Proj> ps = parse_projs(op, weights, grids, biases, meta, 7 * L);
  // HF_EFFICIENT_DECODE_PATH (read per call): "loop" runs the per-layer loop (the reference the tests compare
  // with), "team" the one-region path or an error where it cannot run (so that tests know it ran); else either.
  const char* path = std::getenv("HF_EFFICIENT_DECODE_PATH");
  const bool loop = path != nullptr && std::strcmp(path, "loop") == 0;
  const bool team = !loop && team_fits(ps, mask, num_heads, num_kv_heads, head_dim, app);
  TORCH_CHECK(team || path == nullptr || std::strcmp(path, "team") != 0, op,
              ": HF_EFFICIENT_DECODE_PATH=team, but these arguments need the per-layer loop");
  if (team)
    return decode_layers_team(op, x, norm_weights, eps, ps, cos, sin, mask, scaling, num_heads, num_kv_heads,
                              head_dim, app);
  std::vector<at::Tensor> nk(L), nv(L);
  // q/k/v and the hidden state between layers live in buffers of this call (two for h, so that a layer's output
  // never overwrites its residual input), not in fresh tensors per layer
  at::Tensor q, k, v, h = x, buf[2];
  for (size_t l = 0; l < L; ++l) {
    const Append &ak = app[2 * l], &av = app[2 * l + 1];
    const bool copies = ak.ok && av.ok;  // in place: always (decode_layers_inplace checks)
    SideWork side;  // the past's copies ride along with the q/k/v tiles
    if (copies && !ak.in_place) {
      side.n = ak.heads + av.heads;
      side.run = [&](int64_t u) { u < ak.heads ? ak.copy_past(u) : av.copy_past(u - ak.heads); };
    }
    attn_in(op, h, norm_weights[2 * l], eps[2 * l], &ps[7 * l], cos, sin, num_heads, num_kv_heads, head_dim, q, k, v,
            side);
    if (!copies) {  // a past that is not a contiguous float32 (1, heads, S, d) tensor: at::cat
      nk[l] = at::cat({ak.past, k}, -2);
      nv[l] = at::cat({av.past, v}, -2);
    } else {
      nk[l] = ak.finish(k);
      nv[l] = av.finish(v);
    }
    at::Tensor& out = buf[l % 2];
    out = attn_out_mlp(op, q, ak.attended(nk[l]), av.attended(nv[l]), mask, scaling, h, norm_weights[2 * l + 1], eps[2 * l + 1],
                       &ps[7 * l + 3], out);
    h = out;
  }
  return {h, nk, nv};
}

}  // namespace

// All L decoder layers of one decode token in one call, for a cache whose update is torch.cat((keys, k), -2) per
// layer (transformers' DynamicLayer): per layer l, attn_in (norm l*2, projections 7l..7l+3) -> the cache's concat
// -> attn_out_mlp (norm 2l+1, projections 7l+3..7l+7), i.e. decode_attn_in, the concat and decode_attn_out_mlp
// bit for bit, without a Python round trip per layer. Returns the last layer's output and every layer's new
// keys/values (the caller stores them in its cache layers). One mask (or none) serves every layer.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> decode_layers(
    const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> eps, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& grids, const c10::List<c10::optional<at::Tensor>>& biases,
    at::IntArrayRef meta, const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& mask,
    double scaling, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, at::TensorList keys,
    at::TensorList values) {
  const char* op = "decode_layers";
  const size_t L = keys.size();
  check_layer_lists(op, "keys and values tensor", L, values.size(), norm_weights.size(), eps.size());
  std::vector<Append> app;
  app.reserve(2 * L);
  for (size_t l = 0; l < L; ++l) {
    app.emplace_back(keys[l]);
    app.emplace_back(values[l]);
  }
  return decode_layers_appending(op, x, norm_weights, eps, weights, grids, biases, meta, cos, sin, mask, scaling,
                                 num_heads, num_kv_heads, head_dim, app);
}

// decode_layers with the caches appended in place: layer l's past is rows [0, past) of key_buffers[l] and
// value_buffers[l] (contiguous float32 (1, num_kv_heads, capacity, head_dim), capacity > past, kept by the caller),
// this token's row goes to row past, and attention reads rows [0, past]. Returns the last layer's output; the new
// caches are the buffers' first past + 1 rows (the caller's views). Same values as decode_layers, bit for bit.
at::Tensor decode_layers_inplace(
    const at::Tensor& x, at::TensorList norm_weights, at::ArrayRef<double> eps, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& grids, const c10::List<c10::optional<at::Tensor>>& biases,
    at::IntArrayRef meta, const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& mask,
    double scaling, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, at::TensorList key_buffers,
    at::TensorList value_buffers, int64_t past, at::TensorList key_halves, at::TensorList value_halves) {
  const char* op = "decode_layers_inplace";
  const size_t L = key_buffers.size();
  check_layer_lists(op, "key and value buffer", L, value_buffers.size(), norm_weights.size(), eps.size());
  const bool halves = !key_halves.empty() || !value_halves.empty();
  TORCH_CHECK(!halves || (key_halves.size() == L && value_halves.size() == L), op,
              ": expected no float16 copies or one key and one value copy per layer (", L, "), got ", key_halves.size(),
              " and ", value_halves.size());
  std::vector<Append> app;
  app.reserve(2 * L);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor* bufs[2] = {&key_buffers[l], &value_buffers[l]};
    for (int j = 0; j < 2; ++j) {
      const at::Tensor& b = *bufs[j];
      const at::Tensor copy = halves ? (j == 0 ? key_halves : value_halves)[l] : at::Tensor();
      app.emplace_back(b, copy, past);
      const Append& a = app.back();
      TORCH_CHECK(a.ok && a.heads == num_kv_heads && a.d == head_dim, op, ": layer ", l,
                  "'s buffers must be contiguous float32 CPU (1, ", num_kv_heads, ", capacity > ", past, ", ",
                  head_dim, ") tensors and their float16 copies contiguous CPU tensors of the same shape; got ",
                  b.scalar_type(), " ", b.sizes(), (halves ? c10::str(" and ", copy.scalar_type(), " ", copy.sizes())
                                                           : std::string()));
    }
    TORCH_CHECK(!key_buffers[l].is_same(value_buffers[l]), op, ": layer ", l, "'s key and value buffers are one tensor");
    TORCH_CHECK(!halves || !key_halves[l].is_same(value_halves[l]), op, ": layer ", l,
                "'s key and value float16 copies are one tensor");
  }
  return std::get<0>(decode_layers_appending(op, x, norm_weights, eps, weights, grids, biases, meta, cos, sin, mask,
                                             scaling, num_heads, num_kv_heads, head_dim, app));
}

// y = x W^T (+ bias) for one float32 row x (..., K) and a float32 (N, K) weight: a decode step's output head,
// on the same GEMV as the ops' float projections.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "decode_linear";
  const at::Tensor xc = as_cpu_float(op, "x", x);
  const int64_t K = xc.size(-1);
  TORCH_CHECK(xc.numel() == K, op, ": x must hold one row, got shape ", x.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.size(1) == K,
              op, ": weight must be a float32 CPU (out_features, ", K, ") tensor, got ", weight.scalar_type(), " ",
              weight.sizes());
  Proj p;
  p.K = K;
  p.N = weight.size(0);
  p.weight = weight;
  p.rows = float_rows(lut_isa_cap());
  if (bias.has_value()) {
    p.bias_t = bias->contiguous();
    TORCH_CHECK(p.bias_t.scalar_type() == at::kFloat && p.bias_t.numel() == p.N && p.bias_t.device().is_cpu(), op,
                ": bias must be float32 with ", p.N, " values");
    p.bias = p.bias_t.data_ptr<float>();
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = p.N;
  at::Tensor y = at::empty(sizes, xc.options());
  project({&p}, xc.data_ptr<float>(), {y.data_ptr<float>()});
  return y;
}

}  // namespace lut
}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_attn_in(Tensor x, Tensor norm_weight, float eps, Tensor[] weights, Tensor?[] grids, "
        "Tensor?[] biases, int[] meta, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("decode_layers(Tensor x, Tensor[] norm_weights, float[] eps, Tensor[] weights, Tensor?[] grids, "
        "Tensor?[] biases, int[] meta, Tensor cos, Tensor sin, Tensor? mask, float scaling, int num_heads, "
        "int num_kv_heads, int head_dim, Tensor[] keys, Tensor[] values) -> (Tensor, Tensor[], Tensor[])");
  m.def("decode_layers_inplace(Tensor x, Tensor[] norm_weights, float[] eps, Tensor[] weights, Tensor?[] grids, "
        "Tensor?[] biases, int[] meta, Tensor cos, Tensor sin, Tensor? mask, float scaling, int num_heads, "
        "int num_kv_heads, int head_dim, Tensor(a!)[] key_buffers, Tensor(b!)[] value_buffers, int past, "
        "Tensor(c!)[] key_halves, Tensor(d!)[] value_halves) -> Tensor");
  m.def("decode_attn_out_mlp(Tensor q, Tensor k, Tensor v, Tensor? mask, float scaling, Tensor residual, "
        "Tensor norm_weight, float eps, Tensor[] weights, Tensor?[] grids, Tensor?[] biases, int[] meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("decode_attn_in", &hf_efficient::lut::decode_attn_in);
  m.impl("decode_attn_out_mlp", &hf_efficient::lut::decode_attn_out_mlp);
  m.impl("decode_linear", &hf_efficient::lut::decode_linear);
  m.impl("decode_layers", &hf_efficient::lut::decode_layers);
  m.impl("decode_layers_inplace", &hf_efficient::lut::decode_layers_inplace);
}
