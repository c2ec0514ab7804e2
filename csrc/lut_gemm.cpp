// T-MAC-style LUT GEMV/GEMM on the CPU: y = x @ W^T with W in 1..4-bit codes, no dequantization.
// Layouts and the two engines are described in lut_gemm.h; the plain-torch twin of everything here is
// hf_efficient/quantization/lut/reference.py (tests compare them, bit-exactly for the tables).
//
// Packed weights (uint8, per row tile of 16 rows, tiles in order; Kp = in_features padded to 16):
//   bit-serial: for each pair of 4-activation slots (t, t+1), for each plane pair pp < ceil(bits/2):
//     32 bytes; byte i: lane L = i / 16, p = i % 16, row = 16*tile + 8*L + p/2, plane j = 2*pp + p%2;
//     low nibble = plane-j index of row at slot t, high nibble = same at slot t+1.
//     index = sum_{i<4} bit_j(code[row, 4*slot+i]) << i.
//   code-indexed: for each 4 consecutive slots s..s+3 of gp activations: 32 bytes; byte i: L = i / 16,
//     row = 16*tile + i % 16; low nibble = index of slot s+L, high nibble = index of slot s+2+L;
//     index = sum_{i<gp} code[row, gp*slot+i] << (bits*i).
// coef float (NT, ng, channels, 16), zcoef float (NT, ng, 16): per group and row,
//   y[row] += sum_ch (tscale_g * I_ch) * coef_ch + gsum_g * zcoef,
// where I_ch is the int32 sum of int8 table entries looked up in the group (bit-serial: weighted by 2^j),
// tscale_g the table scale and gsum_g the sum of the group's activations.
#include "lut_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HFE_LUT_X86 1
#endif

namespace hf_efficient {
namespace lut {

// ---------------------------------------------------------------------------------------------------
// Geometry and argument checks
// ---------------------------------------------------------------------------------------------------
static Geometry make_geometry(int64_t K, int64_t N, int64_t bits, int64_t group_size, bool codes,
                              int64_t channels) {
  TORCH_CHECK(bits >= 1 && bits <= 4, "lut: bits must be 1, 2, 3 or 4, got ", bits);
  TORCH_CHECK(codes || bits >= 2, "lut: the bit-serial engine needs bits >= 2 (1-bit weights use the "
              "code-indexed engine: pass a grid), got bits=", bits);
  TORCH_CHECK(group_size > 0 && group_size % kKAlign == 0, "lut: group_size must be a positive multiple of ",
              kKAlign, ", got ", group_size);
  TORCH_CHECK(K > 0 && N > 0, "lut: in_features and out_features must be positive, got K=", K, " N=", N);
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, "lut: grid must have 1 or 2 rows (channels), got ",
              channels);
  Geometry g;
  g.K = K;
  g.Kp = (K + kKAlign - 1) / kKAlign * kKAlign;
  g.N = N;
  g.NT = (N + kTileN - 1) / kTileN;
  g.G = group_size;
  g.ng = (g.Kp + group_size - 1) / group_size;
  g.bits = bits;
  g.codes = codes;
  g.channels = codes ? channels : 1;
  g.slot = codes ? (bits == 3 ? 1 : 4 / bits) : 4;
  g.slots = g.Kp / g.slot;
  g.plane_pairs = (bits + 1) / 2;
  return g;
}

static bool env_forces_scalar() {
  const char* v = std::getenv("HF_EFFICIENT_LUT_SCALAR");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

static bool cpu_has_avx2() {
#if defined(HFE_LUT_X86)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

static bool use_avx2(bool force_scalar) {
  if (force_scalar || env_forces_scalar()) return false;
  if (!cpu_has_avx2()) {
    TORCH_WARN_ONCE("hf_efficient lut: this CPU has no AVX2+FMA; using the (slower) scalar LUT kernels");
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Tables: build float tables for one activation row, quantize them to int8 per weight group
// ---------------------------------------------------------------------------------------------------
// Per-position coefficient vectors: T[idx] = sum_i coeffs[ch][i][idx] * a_i, summed in order of i
// (bit-serial: coeffs are the signs +-1, products exact; code-indexed: grid values of code i of idx).
static std::vector<float> table_coeffs(const Geometry& geo, const float* grid) {
  std::vector<float> c(static_cast<size_t>(geo.channels * geo.slot * 16), 0.0f);
  const int64_t mask = (1 << geo.bits) - 1, nv = int64_t(1) << geo.bits;
  for (int64_t ch = 0; ch < geo.channels; ++ch)
    for (int64_t i = 0; i < geo.slot; ++i)
      for (int64_t idx = 0; idx < 16; ++idx) {
        float v;
        if (!geo.codes) v = ((idx >> i) & 1) ? 1.0f : -1.0f;
        else v = (geo.bits == 3 && idx >= 8) ? 0.0f : grid[ch * nv + ((idx >> (geo.bits * i)) & mask)];
        c[(ch * geo.slot + i) * 16 + idx] = v;
      }
  return c;
}

// Group sums in a fixed order both builders share: 8 interleaved partial sums, combined pairwise.
static inline float combine8(const float* p) {
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// Scalar builder. xp: activations zero-padded to Kp. tab: int8 [channels][slots][16]; tscale, gsum: [ng].
static void build_tables_scalar(const float* xp, const Geometry& geo, const float* coeffs, float* ft, int8_t* tab,
                                float* tscale, float* gsum) {
  const int64_t per_group_max = geo.G / geo.slot;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t k0 = g * geo.G, len = geo.group_len(g), s0 = k0 / geo.slot, ns = len / geo.slot;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, maxabs = 0.0f;
    for (int64_t k = 0; k < len; ++k) part[k % 8] += xp[k0 + k];
    for (int64_t ch = 0; ch < geo.channels; ++ch) {
      const float* cf = coeffs + ch * geo.slot * 16;
      for (int64_t s = 0; s < ns; ++s) {
        float* t = ft + (ch * per_group_max + s) * 16;
        const float* a = xp + (s0 + s) * geo.slot;
        if (!geo.codes) {
          // Mirror consolidation: T[15 - idx] = -T[idx], so only the 8 entries with bit 3 clear are summed.
          for (int idx = 0; idx < 8; ++idx) {
            float v = cf[idx] * a[0];
            for (int64_t i = 1; i < 4; ++i) v += cf[i * 16 + idx] * a[i];
            t[idx] = v;
            t[15 - idx] = -v;
          }
        } else {
          for (int idx = 0; idx < 16; ++idx) {
            float v = cf[idx] * a[0];
            for (int64_t i = 1; i < geo.slot; ++i) v += cf[i * 16 + idx] * a[i];
            t[idx] = v;
          }
        }
        for (int idx = 0; idx < 16; ++idx) maxabs = std::max(maxabs, std::fabs(t[idx]));
      }
    }
    const float inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
    tscale[g] = maxabs / 127.0f;
    gsum[g] = combine8(part);
    for (int64_t ch = 0; ch < geo.channels; ++ch) {
      for (int64_t s = 0; s < ns; ++s) {
        const float* t = ft + (ch * per_group_max + s) * 16;
        int8_t* q = tab + (ch * geo.slots + s0 + s) * 16;
        for (int idx = 0; idx < 16; ++idx) {
          const float r = std::nearbyint(t[idx] * inv);
          q[idx] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
        }
      }
    }
  }
}

// Per-group epilogue shared by all engines (scalar form; the AVX2 form computes the same expression).
static inline void epilogue_scalar(const int32_t* acc /*[channels][16]*/, int64_t channels, float ts, float gs,
                                   const float* coef /*[channels][16]*/, const float* zc, float* y) {
  for (int64_t ch = 0; ch < channels; ++ch)
    for (int r = 0; r < kTileN; ++r) y[r] = std::fma(static_cast<float>(acc[ch * 16 + r]) * ts, coef[ch * 16 + r], y[r]);
  for (int r = 0; r < kTileN; ++r) y[r] = std::fma(gs, zc[r], y[r]);
}

// ---------------------------------------------------------------------------------------------------
// Scalar engines (the portable path; same integer sums as the SIMD paths, which never overflow)
// ---------------------------------------------------------------------------------------------------
static void tile_scalar(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                        const float* coef, const float* zc, const Geometry& geo, float* y) {
  for (int r = 0; r < kTileN; ++r) y[r] = 0.0f;
  int32_t acc[kMaxChannels * 16];
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    std::fill(acc, acc + kMaxChannels * 16, 0);
    const int64_t len = geo.group_len(g);
    if (!geo.codes) {
      for (int64_t pr = 0; pr < len / 8; ++pr, slot += 2) {
        const int8_t* tl = tab + slot * 16;
        const int8_t* th = tl + 16;
        for (int64_t pp = 0; pp < geo.plane_pairs; ++pp, w += 32) {
          for (int i = 0; i < 32; ++i) {
            const int p = i % 16, row = (i / 16) * 8 + p / 2, plane = static_cast<int>(2 * pp) + p % 2;
            const int mult = plane < geo.bits ? (1 << plane) : 0;
            acc[row] += mult * (tl[w[i] & 15] + th[w[i] >> 4]);
          }
        }
      }
    } else {
      for (int64_t it = 0; it < len / geo.slot / 4; ++it, slot += 4, w += 32) {
        for (int64_t ch = 0; ch < geo.channels; ++ch) {
          const int8_t* t = tab + (ch * geo.slots + slot) * 16;
          for (int i = 0; i < 32; ++i) {
            const int L = i / 16, row = i % 16;
            acc[ch * 16 + row] += t[L * 16 + (w[i] & 15)] + t[(2 + L) * 16 + (w[i] >> 4)];
          }
        }
      }
    }
    epilogue_scalar(acc, geo.channels, tscale[g], gsum[g], coef + g * geo.channels * 16, zc + g * 16, y);
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 engines (compiled with target attributes; chosen at run time)
// ---------------------------------------------------------------------------------------------------
#if defined(HFE_LUT_X86)
#define HFE_AVX2 __attribute__((target("avx2,fma")))
// The table builder must round like the scalar builder: without "fma" in its target the compiler cannot
// contract its mul+add pairs into fused multiply-adds.
#define HFE_AVX2_NOFMA __attribute__((target("avx2")))

HFE_AVX2 static inline void widen_add(__m256i acc16, __m256i& lo32, __m256i& hi32) {
  lo32 = _mm256_add_epi32(lo32, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16)));
  hi32 = _mm256_add_epi32(hi32, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16, 1)));
}

HFE_AVX2 static inline void epilogue_avx2(const __m256i* lo32, const __m256i* hi32, int64_t channels, float ts,
                                          float gs, const float* coef, const float* zc, __m256& y0, __m256& y1) {
  const __m256 vts = _mm256_set1_ps(ts);
  for (int64_t ch = 0; ch < channels; ++ch) {
    y0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo32[ch]), vts), _mm256_loadu_ps(coef + ch * 16), y0);
    y1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi32[ch]), vts), _mm256_loadu_ps(coef + ch * 16 + 8), y1);
  }
  const __m256 vgs = _mm256_set1_ps(gs);
  y0 = _mm256_fmadd_ps(vgs, _mm256_loadu_ps(zc), y0);
  y1 = _mm256_fmadd_ps(vgs, _mm256_loadu_ps(zc + 8), y1);
}

// Bit-serial: PP plane pairs, R row tiles sharing each table load. Each lookup byte pair (plane 2pp,
// plane 2pp+1) of one row is combined by vpmaddubsw with multipliers (2^(2pp), 2^(2pp+1)), which also
// widens to int16.
template <int PP, int R>
HFE_AVX2 static void tile_bitserial_avx2(const uint8_t* w, const int8_t* tab, const float* tscale,
                                         const float* gsum, const float* coef, const float* zc,
                                         const Geometry& geo, float* y) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256i mult[2];
  for (int pp = 0; pp < 2; ++pp) {
    const int j0 = 2 * pp, j1 = 2 * pp + 1;
    const int m0 = j0 < geo.bits ? 1 << j0 : 0, m1 = j1 < geo.bits ? 1 << j1 : 0;
    mult[pp] = _mm256_set1_epi16(static_cast<int16_t>(m0 | (m1 << 8)));
  }
  // int16 headroom: each slot pair adds at most 2 * (2^bits - 1) * 127 per row.
  const int64_t chunk = 32767 / (2 * ((1 << geo.bits) - 1) * 127);
  const int64_t tb = geo.tile_bytes(), cstride = geo.ng * kTileN;
  const uint8_t* wr[R];
  __m256 y0[R], y1[R];
  for (int r = 0; r < R; ++r) {
    wr[r] = w + r * tb;
    y0[r] = y1[r] = _mm256_setzero_ps();
  }
  const int8_t* t = tab;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t pairs = geo.group_len(g) / 8;
    __m256i lo32[R], hi32[R];
    for (int r = 0; r < R; ++r) lo32[r] = hi32[r] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < pairs; c0 += chunk) {
      const int64_t c1 = std::min(pairs, c0 + chunk);
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int64_t pr = c0; pr < c1; ++pr, t += 32) {
        const __m256i tl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m256i th = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        for (int r = 0; r < R; ++r) {
          for (int pp = 0; pp < PP; ++pp, wr[r] += 32) {
            const __m256i W = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r]));
            const __m256i lo = _mm256_and_si256(W, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), nib);
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(mult[pp], _mm256_shuffle_epi8(tl, lo)));
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(mult[pp], _mm256_shuffle_epi8(th, hi)));
          }
        }
      }
      for (int r = 0; r < R; ++r) widen_add(acc[r], lo32[r], hi32[r]);
    }
    for (int r = 0; r < R; ++r)
      epilogue_avx2(&lo32[r], &hi32[r], 1, tscale[g], gsum[g], coef + r * cstride + g * 16, zc + r * cstride + g * 16,
                    y0[r], y1[r]);
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * kTileN, y0[r]);
    _mm256_storeu_ps(y + r * kTileN + 8, y1[r]);
  }
}

// Code-indexed: tables of slots (s, s+1) sit in the two lanes of one 32-byte load, (s+2, s+3) in the
// next. Lookups of slot s and s+2 for the same row are interleaved by vpunpck{l,h}bw and summed to int16
// by vpmaddubsw with ones; the two lanes (slots s and s+1) are folded at the end of a chunk.
template <int P>
HFE_AVX2 static void tile_codes_avx2(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                                     const float* coef, const float* zc, const Geometry& geo, float* y) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi8(1);
  const int64_t chunk = 128;  // each iteration adds at most 2 * 127 per int16 lane
  __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t iters = geo.group_len(g) / geo.slot / 4;
    __m256i lo32[P], hi32[P];
    for (int ch = 0; ch < P; ++ch) lo32[ch] = hi32[ch] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < iters; c0 += chunk) {
      const int64_t c1 = std::min(iters, c0 + chunk);
      __m256i accA[P], accB[P];
      for (int ch = 0; ch < P; ++ch) accA[ch] = accB[ch] = _mm256_setzero_si256();
      for (int64_t it = c0; it < c1; ++it, w += 32, slot += 4) {
        const __m256i W = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i lo = _mm256_and_si256(W, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), nib);
        for (int ch = 0; ch < P; ++ch) {
          const int8_t* t = tab + (ch * geo.slots + slot) * 16;
          const __m256i l1 = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)), lo);
          const __m256i l2 = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)), hi);
          accA[ch] = _mm256_add_epi16(accA[ch], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(l1, l2)));
          accB[ch] = _mm256_add_epi16(accB[ch], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(l1, l2)));
        }
      }
      for (int ch = 0; ch < P; ++ch) {
        // accA holds rows 0..7 in both lanes (lane = slot parity), accB rows 8..15: fold the lanes.
        widen_add(accA[ch], lo32[ch], lo32[ch]);
        widen_add(accB[ch], hi32[ch], hi32[ch]);
      }
    }
    epilogue_avx2(lo32, hi32, P, tscale[g], gsum[g], coef + g * P * 16, zc + g * 16, y0, y1);
  }
  _mm256_storeu_ps(y, y0);
  _mm256_storeu_ps(y + 8, y1);
}
// AVX2 builder: same entries, same summation order and rounding (nearest-even) as the scalar builder,
// 16 entries of a slot in two 8-float vectors.
HFE_AVX2_NOFMA static void build_tables_avx2(const float* xp, const Geometry& geo, const float* coeffs, float* ft,
                                             int8_t* tab, float* tscale, float* gsum) {
  const int64_t per_group_max = geo.G / geo.slot;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t k0 = g * geo.G, len = geo.group_len(g), s0 = k0 / geo.slot, ns = len / geo.slot;
    __m256 part = _mm256_setzero_ps(), vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < len; k += 8) part = _mm256_add_ps(part, _mm256_loadu_ps(xp + k0 + k));
    for (int64_t ch = 0; ch < geo.channels; ++ch) {
      const float* cf = coeffs + ch * geo.slot * 16;
      for (int64_t s = 0; s < ns; ++s) {
        float* t = ft + (ch * per_group_max + s) * 16;
        const float* a = xp + (s0 + s) * geo.slot;
        __m256 a0 = _mm256_set1_ps(a[0]);
        __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(cf), a0), hi = _mm256_mul_ps(_mm256_loadu_ps(cf + 8), a0);
        for (int64_t i = 1; i < geo.slot; ++i) {
          const __m256 ai = _mm256_set1_ps(a[i]);
          lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(cf + i * 16), ai));
          hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(cf + i * 16 + 8), ai));
        }
        _mm256_storeu_ps(t, lo);
        _mm256_storeu_ps(t + 8, hi);
        vmax = _mm256_max_ps(vmax, _mm256_max_ps(_mm256_and_ps(lo, absmask), _mm256_and_ps(hi, absmask)));
      }
    }
    alignas(32) float buf[8];
    _mm256_store_ps(buf, vmax);
    float maxabs = 0.0f;
    for (float v : buf) maxabs = std::max(maxabs, v);
    _mm256_store_ps(buf, part);
    gsum[g] = combine8(buf);
    const float inv = maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
    tscale[g] = maxabs / 127.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    for (int64_t ch = 0; ch < geo.channels; ++ch) {
      for (int64_t s = 0; s < ns; ++s) {
        const float* t = ft + (ch * per_group_max + s) * 16;
        __m256i q0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(t), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i q1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(t + 8), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        q0 = _mm256_min_epi32(lim, _mm256_max_epi32(nlim, q0));
        q1 = _mm256_min_epi32(lim, _mm256_max_epi32(nlim, q1));
        // int32 -> int16 -> int8 with the lane interleaving of the pack instructions undone.
        const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
        const __m256i w8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(w16, w16), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tab + (ch * geo.slots + s0 + s) * 16),
                         _mm256_castsi256_si128(w8));
      }
    }
  }
}
#endif  // HFE_LUT_X86

using TileFn = void (*)(const uint8_t*, const int8_t*, const float*, const float*, const float*, const float*,
                        const Geometry&, float*);

// pair: a function computing two adjacent row tiles at once (nullptr where the engine has none).
static TileFn pick_tile_fn(const Geometry& geo, bool avx2, bool pair) {
#if defined(HFE_LUT_X86)
  if (avx2) {
    if (!geo.codes) {
      if (pair) return geo.plane_pairs == 1 ? &tile_bitserial_avx2<1, 2> : &tile_bitserial_avx2<2, 2>;
      return geo.plane_pairs == 1 ? &tile_bitserial_avx2<1, 1> : &tile_bitserial_avx2<2, 1>;
    }
    if (pair) return nullptr;
    return geo.channels == 1 ? &tile_codes_avx2<1> : &tile_codes_avx2<2>;
  }
#endif
  // NEON (tbl) engines are not written yet: ARM builds run the scalar engine.
  (void)avx2;
  return pair ? nullptr : &tile_scalar;
}

// ---------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------
static Geometry checked_geometry(const at::Tensor& x, const c10::optional<at::Tensor>& grid, int64_t bits,
                                 int64_t group_size, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu(), "lut: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "lut: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "lut: x must be 2-D (M, in_features), got shape ", x.sizes());
  int64_t channels = 1;
  if (grid.has_value()) {
    const at::Tensor& gr = *grid;
    TORCH_CHECK(gr.scalar_type() == at::kFloat && gr.dim() == 2 && gr.size(1) == (int64_t(1) << bits),
                "lut: grid must be float32 (channels, 2**bits) = (*, ", int64_t(1) << bits, "), got ",
                gr.scalar_type(), " ", gr.sizes());
    channels = gr.size(0);
  }
  return make_geometry(x.size(1), out_features, bits, group_size, grid.has_value(), channels);
}

static void check_weights(const Geometry& geo, const at::Tensor& qweight, const at::Tensor& coef,
                          const at::Tensor& zcoef) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.device().is_cpu(),
              "lut: qweight must be a contiguous uint8 CPU tensor, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.numel() == geo.NT * geo.tile_bytes(), "lut: qweight has ", qweight.numel(),
              " bytes but in_features=", geo.K, ", out_features=", geo.N, ", bits=", geo.bits,
              " need ", geo.NT * geo.tile_bytes(), " (was it packed for another shape?)");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
                  coef.numel() == geo.NT * geo.ng * geo.channels * kTileN,
              "lut: coef must be contiguous float32 of shape (", geo.NT, ", ", geo.ng, ", ", geo.channels, ", ",
              kTileN, "), got ", coef.scalar_type(), " ", coef.sizes());
  TORCH_CHECK(zcoef.scalar_type() == at::kFloat && zcoef.is_contiguous() &&
                  zcoef.numel() == geo.NT * geo.ng * kTileN,
              "lut: zcoef must be contiguous float32 of shape (", geo.NT, ", ", geo.ng, ", ", kTileN, "), got ",
              zcoef.scalar_type(), " ", zcoef.sizes());
}

struct Tables {
  at::Tensor tab, tscale, gsum;
};

static Tables make_tables(const at::Tensor& xc, const Geometry& geo, const c10::optional<at::Tensor>& grid,
                          bool avx2) {
  const int64_t M = xc.size(0);
  Tables t{at::empty({M, geo.channels, geo.slots, 16}, xc.options().dtype(at::kChar)),
           at::empty({M, geo.ng}, xc.options()), at::empty({M, geo.ng}, xc.options())};
  at::Tensor gr = grid.has_value() ? grid->contiguous() : at::Tensor();
  const std::vector<float> coeffs = table_coeffs(geo, grid.has_value() ? gr.data_ptr<float>() : nullptr);
  const float* px = xc.data_ptr<float>();
  int8_t* tab = t.tab.data_ptr<int8_t>();
  float *ts = t.tscale.data_ptr<float>(), *gs = t.gsum.data_ptr<float>();
  auto builder = &build_tables_scalar;
#if defined(HFE_LUT_X86)
  if (avx2) builder = &build_tables_avx2;
#endif
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<float> xp(static_cast<size_t>(geo.Kp), 0.0f);
    std::vector<float> ft(static_cast<size_t>(geo.channels * (geo.G / geo.slot) * 16));
    for (int64_t m = b; m < e; ++m) {
      std::memcpy(xp.data(), px + m * geo.K, sizeof(float) * geo.K);
      builder(xp.data(), geo, coeffs.data(), ft.data(), tab + m * geo.channels * geo.slots * 16, ts + m * geo.ng,
              gs + m * geo.ng);
    }
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lut_tables(const at::Tensor& x, const c10::optional<at::Tensor>& grid,
                                                          int64_t bits, int64_t group_size, bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, 1);
  Tables t = make_tables(x.contiguous(), geo, grid, use_avx2(force_scalar));
  return {t.tab, t.tscale, t.gsum};
}

at::Tensor lut_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& coef, const at::Tensor& zcoef,
                    const c10::optional<at::Tensor>& grid, int64_t bits, int64_t group_size, int64_t out_features,
                    bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, out_features);
  check_weights(geo, qweight, coef, zcoef);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = geo.N;
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0) return out;
  const bool avx2 = use_avx2(force_scalar);
  Tables t = make_tables(xc, geo, grid, avx2);
  const TileFn fn = pick_tile_fn(geo, avx2, false), fn2 = pick_tile_fn(geo, avx2, true);
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const int8_t* tab = t.tab.data_ptr<int8_t>();
  const float *ts = t.tscale.data_ptr<float>(), *gs = t.gsum.data_ptr<float>();
  const float *cf = coef.data_ptr<float>(), *zc = zcoef.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t tb = geo.tile_bytes(), tab_stride = geo.channels * geo.slots * 16;
  // Work items are pairs of row tiles where the engine shares table loads between two tiles.
  const int64_t step = fn2 ? 2 : 1, items = (geo.NT + step - 1) / step;
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    alignas(32) float y[2 * kTileN];
    for (int64_t item = b; item < e; ++item) {
      const int64_t nt = item * step, ntiles = std::min(step, geo.NT - nt);
      const TileFn f = ntiles == 2 ? fn2 : fn;
      const int64_t rows = std::min(ntiles * kTileN, N - nt * kTileN);
      // The tiles' weights stay in L1/L2 across activation rows.
      for (int64_t m = 0; m < M; ++m) {
        f(w + nt * tb, tab + m * tab_stride, ts + m * geo.ng, gs + m * geo.ng,
          cf + nt * geo.ng * geo.channels * kTileN, zc + nt * geo.ng * kTileN, geo, y);
        std::memcpy(po + m * N + nt * kTileN, y, sizeof(float) * rows);
      }
    }
  });
  return out;
}

std::string lut_isa(bool force_scalar) { return use_avx2(force_scalar) ? "avx2" : "scalar"; }

}  // namespace lut
}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("lut_gemm(Tensor x, Tensor qweight, Tensor coef, Tensor zcoef, Tensor? grid, int bits, int group_size, "
        "int out_features, bool force_scalar=False) -> Tensor");
  m.def("lut_tables(Tensor x, Tensor? grid, int bits, int group_size, bool force_scalar=False) -> (Tensor, Tensor, Tensor)");
  m.def("lut_isa(bool force_scalar=False) -> str", &hf_efficient::lut::lut_isa);
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("lut_gemm", &hf_efficient::lut::lut_gemm);
  m.impl("lut_tables", &hf_efficient::lut::lut_tables);
}
