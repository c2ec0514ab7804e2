// T-MAC-style LUT GEMV/GEMM on the CPU: y = x @ W^T with W in 1..4-bit codes, no dequantization.
// Layouts and the two engines are described in lut_gemm.h; the plain-torch twin of everything here is
// hf_efficient/quantization/lut/reference.py (tests compare them, bit-exactly for the tables).
//
// Packed weights: one uint8 stream per tile of kTileN = 32 rows (two 16-row subtiles), tiles in order,
// Kp = in_features padded to 16. Per weight group g, the group's steps, then its fp16 coefficients:
//   bit-serial step = a pair of 4-activation slots (t, t+1); for each subtile r, for each plane pair
//     pp < bits/2: 32 bytes; byte i: lane L = i / 16, p = i % 16, row = 32*tile + 16*r + 8*L + p/2,
//     plane j = 2*pp + p%2; low nibble = plane-j index of row at slot t, high nibble = same at slot t+1;
//     index = sum_{i<4} bit_j(code[row, 4*slot+i]) << i. Odd bits: then 32 bytes of the top plane j = bits-1
//     alone, byte i: row = 32*tile + i (low nibble slot t, high nibble slot t+1).
//   code-indexed step = 4 slots s..s+3 of gp activations; for each subtile r: 32 bytes; byte i:
//     L = i / 16, row = 32*tile + 16*r + i % 16; low nibble = index of slot s+L, high nibble = index of
//     slot s+2+L; index = sum_{i<gp} code[row, gp*slot+i] << (bits*i).
//   then coef fp16 (kSub, channels, 16) and zmul fp16 (kSub, 16). Per group and row,
//     y[row] += sum_ch (tscale_g * I_ch) * coef_ch + gsum_g * (coef_0 * zmul),
// where I_ch is the int32 sum of int8 table entries looked up in the group (bit-serial: weighted by 2^j),
// tscale_g the table scale and gsum_g the sum of the group's activations. Keeping codes and coefficients
// in one sequential stream per tile lets the hardware prefetcher run ahead on a single stream.
#include "lut_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
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
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define HFE_LUT_NEON 1
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
  g.plane_pairs = bits / 2;
  g.odd_plane = !codes && bits % 2 == 1;
  return g;
}

static bool env_forces_scalar() {
  const char* v = std::getenv("HF_EFFICIENT_LUT_SCALAR");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

static bool cpu_has_avx2() {
#if defined(HFE_LUT_X86)
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// The SIMD engines: AVX2 (x86, checked at run time) or NEON (AArch64, always present).
static bool use_simd(bool force_scalar) {
  if (force_scalar || env_forces_scalar()) return false;
#if defined(HFE_LUT_X86)
  if (!cpu_has_avx2()) {
    TORCH_WARN_ONCE("hf_efficient lut: this CPU has no AVX2+FMA+F16C; using the (slower) scalar LUT kernels");
    return false;
  }
  return true;
#elif defined(HFE_LUT_NEON)
  return true;
#else
  TORCH_WARN_ONCE("hf_efficient lut: no SIMD engine for this CPU; using the (slower) scalar LUT kernels");
  return false;
#endif
}

static const char* simd_name() {
#if defined(HFE_LUT_NEON)
  return "neon";
#else
  return "avx2";
#endif
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

static inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// Per-group epilogue of one subtile, shared by all engines (scalar form; the SIMD forms compute the same
// expression in the same order). coef: fp16 [channels][16], zmul: fp16 [16].
static inline void epilogue_scalar(const int32_t* acc /*[channels][16]*/, int64_t channels, float ts, float gs,
                                   const uint16_t* coef, const uint16_t* zmul, float* y) {
  for (int64_t ch = 0; ch < channels; ++ch)
    for (int r = 0; r < kSubRows; ++r)
      y[r] = std::fma(static_cast<float>(acc[ch * 16 + r]) * ts, half_to_float(coef[ch * 16 + r]), y[r]);
  for (int r = 0; r < kSubRows; ++r) y[r] = std::fma(gs, half_to_float(coef[r]) * half_to_float(zmul[r]), y[r]);
}

// ---------------------------------------------------------------------------------------------------
// Scalar engine (the portable path; same integer sums as the SIMD paths, which never overflow)
// ---------------------------------------------------------------------------------------------------
static void tile_scalar(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                        const Geometry& geo, float* y) {
  std::fill(y, y + kTileN, 0.0f);
  int32_t acc[kSub][kMaxChannels * 16];
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    std::fill(&acc[0][0], &acc[0][0] + kSub * kMaxChannels * 16, 0);
    const int64_t steps = geo.steps(g);
    for (int64_t st = 0; st < steps; ++st) {
      if (!geo.codes) {
        const int8_t* tl = tab + slot * 16;
        const int8_t* th = tl + 16;
        for (int64_t r = 0; r < kSub; ++r)
          for (int64_t pp = 0; pp < geo.plane_pairs; ++pp, w += 32)
            for (int i = 0; i < 32; ++i) {
              const int p = i % 16, row = (i / 16) * 8 + p / 2, plane = static_cast<int>(2 * pp) + p % 2;
              acc[r][row] += (1 << plane) * (tl[w[i] & 15] + th[w[i] >> 4]);
            }
        if (geo.odd_plane) {
          for (int i = 0; i < 32; ++i) acc[i / 16][i % 16] += (1 << (geo.bits - 1)) * (tl[w[i] & 15] + th[w[i] >> 4]);
          w += 32;
        }
        slot += 2;
      } else {
        for (int64_t r = 0; r < kSub; ++r, w += 32)
          for (int64_t ch = 0; ch < geo.channels; ++ch) {
            const int8_t* t = tab + (ch * geo.slots + slot) * 16;
            for (int i = 0; i < 32; ++i) {
              const int L = i / 16, row = i % 16;
              acc[r][ch * 16 + row] += t[L * 16 + (w[i] & 15)] + t[(2 + L) * 16 + (w[i] >> 4)];
            }
          }
        slot += 4;
      }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int64_t r = 0; r < kSub; ++r)
      epilogue_scalar(acc[r], geo.channels, tscale[g], gsum[g], cf + r * geo.channels * 16,
                      cf + kSub * geo.channels * 16 + r * 16, y + r * kSubRows);
    w += geo.coef_bytes();
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 engines (compiled with target attributes; chosen at run time)
// ---------------------------------------------------------------------------------------------------
#if defined(HFE_LUT_X86)
#define HFE_AVX2 __attribute__((target("avx2,fma,f16c")))
// The table builder must round like the scalar builder: without "fma" in its target the compiler cannot
// contract its mul+add pairs into fused multiply-adds.
#define HFE_AVX2_NOFMA __attribute__((target("avx2")))

// Bytes ahead of the current weight read to prefetch, into L2: the stream is sequential, and software
// prefetch keeps many DRAM lines in flight per core where the hardware prefetcher alone falls behind (it
// stops at page boundaries). Measured on a DRAM-resident 4096x4096 INT2 GEMV (benchmarks/lut_cpu.py): 8 KiB
// into L2 beat 1 KiB into L1 by 8-20 %; 256 B and non-temporal hints were slower.
constexpr int64_t kPrefetch = 8192;

HFE_AVX2 static inline void prefetch_stream(const uint8_t* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T1);
}

HFE_AVX2 static inline void widen_add(__m256i acc16, __m256i& lo32, __m256i& hi32) {
  lo32 = _mm256_add_epi32(lo32, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16)));
  hi32 = _mm256_add_epi32(hi32, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16, 1)));
}

HFE_AVX2 static inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

HFE_AVX2 static inline void epilogue_avx2(const __m256i* lo32, const __m256i* hi32, int64_t channels, float ts,
                                          float gs, const uint16_t* coef, const uint16_t* zmul, __m256& y0,
                                          __m256& y1) {
  const __m256 vts = _mm256_set1_ps(ts);
  for (int64_t ch = 0; ch < channels; ++ch) {
    y0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo32[ch]), vts), load_half8(coef + ch * 16), y0);
    y1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi32[ch]), vts), load_half8(coef + ch * 16 + 8), y1);
  }
  const __m256 vgs = _mm256_set1_ps(gs);
  y0 = _mm256_fmadd_ps(vgs, _mm256_mul_ps(load_half8(coef), load_half8(zmul)), y0);
  y1 = _mm256_fmadd_ps(vgs, _mm256_mul_ps(load_half8(coef + 8), load_half8(zmul + 8)), y1);
}

HFE_AVX2 static inline void store_tile(const __m256* y0, const __m256* y1, float* y) {
  for (int r = 0; r < kSub; ++r) {
    _mm256_storeu_ps(y + r * kSubRows, y0[r]);
    _mm256_storeu_ps(y + r * kSubRows + 8, y1[r]);
  }
}

// Bit-serial: PP plane pairs. Each lookup byte pair (plane 2pp, plane 2pp+1) of one row is combined by
// vpmaddubsw with multipliers (2^(2pp), 2^(2pp+1)), which also widens to int16. The kSub subtiles share
// the two table loads of a step. ODD: a lone top plane covers all 32 rows in one vector; its slot-t and
// slot-t+1 lookups of a row are paired by vpunpck{l,h}bw (lane = subtile) before vpmaddubsw.
template <int PP, bool ODD>
HFE_AVX2 static void tile_bitserial_avx2(const uint8_t* w, const int8_t* tab, const float* tscale,
                                         const float* gsum, const Geometry& geo, float* y) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i mult[2] = {_mm256_set1_epi16(0x0201), _mm256_set1_epi16(0x0804)};
  const __m256i mtop = _mm256_set1_epi8(static_cast<char>(1 << (geo.bits - 1)));
  // int16 headroom: each step adds at most 2 * (2^bits - 1) * 127 per row (and the lone plane alone less).
  const int64_t chunk = 32767 / (2 * ((1 << geo.bits) - 1) * 127);
  __m256 y0[kSub], y1[kSub];
  for (int r = 0; r < kSub; ++r) y0[r] = y1[r] = _mm256_setzero_ps();
  const int8_t* t = tab;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    __m256i lo32[kSub], hi32[kSub];
    for (int r = 0; r < kSub; ++r) lo32[r] = hi32[r] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
      const int64_t c1 = std::min(steps, c0 + chunk);
      __m256i acc[kSub], topA = _mm256_setzero_si256(), topB = _mm256_setzero_si256();
      for (int r = 0; r < kSub; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t st = c0; st < c1; ++st, t += 32) {
        prefetch_stream(w);
        if (PP == 2) prefetch_stream(w + 64);
        const __m256i tl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
        const __m256i th = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16)));
        for (int r = 0; r < kSub; ++r) {
          for (int pp = 0; pp < PP; ++pp, w += 32) {
            const __m256i W = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
            const __m256i lo = _mm256_and_si256(W, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), nib);
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(mult[pp], _mm256_shuffle_epi8(tl, lo)));
            acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(mult[pp], _mm256_shuffle_epi8(th, hi)));
          }
        }
        if (ODD) {
          const __m256i W = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
          w += 32;
          const __m256i l1 = _mm256_shuffle_epi8(tl, _mm256_and_si256(W, nib));
          const __m256i l2 = _mm256_shuffle_epi8(th, _mm256_and_si256(_mm256_srli_epi16(W, 4), nib));
          topA = _mm256_add_epi16(topA, _mm256_maddubs_epi16(mtop, _mm256_unpacklo_epi8(l1, l2)));
          topB = _mm256_add_epi16(topB, _mm256_maddubs_epi16(mtop, _mm256_unpackhi_epi8(l1, l2)));
        }
      }
      for (int r = 0; r < kSub; ++r) widen_add(acc[r], lo32[r], hi32[r]);
      if (ODD) {
        static_assert(kSub == 2, "the lone top plane vector holds exactly two subtiles");
        // topA: lane r = rows 0..7 of subtile r, topB: rows 8..15.
        widen_add(topA, lo32[0], lo32[1]);
        widen_add(topB, hi32[0], hi32[1]);
      }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < kSub; ++r)
      epilogue_avx2(&lo32[r], &hi32[r], 1, tscale[g], gsum[g], cf + r * 16, cf + (kSub + r) * 16, y0[r], y1[r]);
    w += geo.coef_bytes();
  }
  store_tile(y0, y1, y);
}

// Code-indexed: tables of slots (s, s+1) sit in the two lanes of one 32-byte load, (s+2, s+3) in the
// next. Lookups of slot s and s+2 for the same row are interleaved by vpunpck{l,h}bw and summed to int16
// by vpmaddubsw with ones; the two lanes (slots s and s+1) are folded at the end of a chunk. The kSub
// subtiles share the table loads.
template <int P>
HFE_AVX2 static void tile_codes_avx2(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                                     const Geometry& geo, float* y) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi8(1);
  const int64_t chunk = 128;  // each step adds at most 2 * 127 per int16 lane
  __m256 y0[kSub], y1[kSub];
  for (int r = 0; r < kSub; ++r) y0[r] = y1[r] = _mm256_setzero_ps();
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    __m256i lo32[kSub][P], hi32[kSub][P];
    for (int r = 0; r < kSub; ++r)
      for (int ch = 0; ch < P; ++ch) lo32[r][ch] = hi32[r][ch] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
      const int64_t c1 = std::min(steps, c0 + chunk);
      __m256i accA[kSub][P], accB[kSub][P];
      for (int r = 0; r < kSub; ++r)
        for (int ch = 0; ch < P; ++ch) accA[r][ch] = accB[r][ch] = _mm256_setzero_si256();
      for (int64_t st = c0; st < c1; ++st, slot += 4) {
        prefetch_stream(w);
        __m256i T1[P], T2[P];
        for (int ch = 0; ch < P; ++ch) {
          const int8_t* t = tab + (ch * geo.slots + slot) * 16;
          T1[ch] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
          T2[ch] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32));
        }
        for (int r = 0; r < kSub; ++r, w += 32) {
          const __m256i W = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
          const __m256i lo = _mm256_and_si256(W, nib);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), nib);
          for (int ch = 0; ch < P; ++ch) {
            const __m256i l1 = _mm256_shuffle_epi8(T1[ch], lo);
            const __m256i l2 = _mm256_shuffle_epi8(T2[ch], hi);
            accA[r][ch] = _mm256_add_epi16(accA[r][ch], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(l1, l2)));
            accB[r][ch] = _mm256_add_epi16(accB[r][ch], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(l1, l2)));
          }
        }
      }
      for (int r = 0; r < kSub; ++r)
        for (int ch = 0; ch < P; ++ch) {
          // accA holds rows 0..7 in both lanes (lane = slot parity), accB rows 8..15: fold the lanes.
          widen_add(accA[r][ch], lo32[r][ch], lo32[r][ch]);
          widen_add(accB[r][ch], hi32[r][ch], hi32[r][ch]);
        }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < kSub; ++r)
      epilogue_avx2(lo32[r], hi32[r], P, tscale[g], gsum[g], cf + r * P * 16, cf + kSub * P * 16 + r * 16, y0[r],
                    y1[r]);
    w += geo.coef_bytes();
  }
  store_tile(y0, y1, y);
}

// A group's table scale (its largest |entry| maps to 127) and activation sum, from the 8-lane running
// max and sum; returns the factor that quantizes the group's float entries to int8.
HFE_AVX2_NOFMA static inline float finish_group(__m256 vmax, __m256 part, float* tscale, float* gsum) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, vmax);
  float maxabs = 0.0f;
  for (float v : buf) maxabs = std::max(maxabs, v);
  _mm256_store_ps(buf, part);
  *gsum = combine8(buf);
  *tscale = maxabs / 127.0f;
  return maxabs > 0.0f ? 127.0f / maxabs : 0.0f;
}

// Bit-serial AVX2 builder. Entries idx < 8 (bit 3 clear) are one 8-float vector per slot, summed in the
// scalar builder's order ((+-a0 +- a1) +- a2) - a3 (sign flips are exact); the mirror T[15 - idx] = -T[idx]
// gives the other 8, and round-to-nearest-even commutes with negation, so the int8 halves mirror exactly.
HFE_AVX2_NOFMA static void build_bitserial_avx2(const float* xp, const Geometry& geo, float* ft, int8_t* tab,
                                                float* tscale, float* gsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // Sign masks: lane idx gets -a_i where bit i of idx is clear.
  __m256 neg[3];
  for (int i = 0; i < 3; ++i) {
    alignas(32) uint32_t m[8];
    for (int idx = 0; idx < 8; ++idx) m[idx] = ((idx >> i) & 1) ? 0u : 0x80000000u;
    neg[i] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m)));
  }
  const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t k0 = g * geo.G, len = geo.group_len(g), s0 = k0 / 4, ns = len / 4;
    __m256 part = _mm256_setzero_ps(), vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < len; k += 8) part = _mm256_add_ps(part, _mm256_loadu_ps(xp + k0 + k));
    for (int64_t s = 0; s < ns; ++s) {
      const float* a = xp + k0 + 4 * s;
      __m256 v = _mm256_xor_ps(_mm256_broadcast_ss(a), neg[0]);
      v = _mm256_add_ps(v, _mm256_xor_ps(_mm256_broadcast_ss(a + 1), neg[1]));
      v = _mm256_add_ps(v, _mm256_xor_ps(_mm256_broadcast_ss(a + 2), neg[2]));
      v = _mm256_sub_ps(v, _mm256_broadcast_ss(a + 3));
      _mm256_storeu_ps(ft + 8 * s, v);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
    }
    const __m256 vinv = _mm256_set1_ps(finish_group(vmax, part, tscale + g, gsum + g));
    for (int64_t s = 0; s < ns; ++s) {
      __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(ft + 8 * s), vinv),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      q = _mm256_min_epi32(lim, _mm256_max_epi32(nlim, q));
      const __m256i m = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_permutevar8x32_epi32(q, rev));
      // int32 -> int16 -> int8 with the lane interleaving of the pack instructions undone.
      const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q, m), 0xD8);
      const __m256i w8 = _mm256_permute4x64_epi64(_mm256_packs_epi16(w16, w16), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tab + (s0 + s) * 16), _mm256_castsi256_si128(w8));
    }
  }
}

// Code-indexed AVX2 builder: same entries, same summation order and rounding (nearest-even) as the scalar
// builder, 16 entries of a slot in two 8-float vectors.
HFE_AVX2_NOFMA static void build_codes_avx2(const float* xp, const Geometry& geo, const float* coeffs, float* ft,
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
    const __m256 vinv = _mm256_set1_ps(finish_group(vmax, part, tscale + g, gsum + g));
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

#if defined(HFE_LUT_NEON)
// NEON bit-serial engine (tbl): the AVX2 bit-serial loop on 128-bit halves. Lanes of a 32-byte subtile
// block are rows 0..7 and 8..15; vmull/vmlal by the plane weights replace vpmaddubsw. Compiled on ARM only
// (not exercised by this project's x86 CI).
template <int PP>
static void tile_bitserial_neon(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                                const Geometry& geo, float* y) {
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  int8x16_t mult[2];
  for (int pp = 0; pp < 2; ++pp) {
    alignas(16) int8_t m[16];
    for (int p = 0; p < 16; ++p) m[p] = static_cast<int8_t>(1 << (2 * pp + p % 2));
    mult[pp] = vld1q_s8(m);
  }
  const int64_t chunk = 32767 / (2 * ((1 << geo.bits) - 1) * 127);
  std::fill(y, y + kTileN, 0.0f);
  const int8_t* t = tab;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    int32_t acc32[kSub][16] = {};
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
      const int64_t c1 = std::min(steps, c0 + chunk);
      int16x8_t acc[kSub][2];
      for (int r = 0; r < kSub; ++r) acc[r][0] = acc[r][1] = vdupq_n_s16(0);
      for (int64_t st = c0; st < c1; ++st, t += 32) {
        const int8x16_t tl = vld1q_s8(t), th = vld1q_s8(t + 16);
        for (int r = 0; r < kSub; ++r)
          for (int pp = 0; pp < PP; ++pp, w += 32)
            for (int L = 0; L < 2; ++L) {
              const uint8x16_t W = vld1q_u8(w + 16 * L);
              // Widen while weighting (vmull): int8 * 2^j can overflow int8.
              const int8x16_t ll = vqtbl1q_s8(tl, vandq_u8(W, nib)), hh = vqtbl1q_s8(th, vshrq_n_u8(W, 4));
              const int16x8_t pl = vpaddq_s16(vmull_s8(vget_low_s8(ll), vget_low_s8(mult[pp])),
                                              vmull_s8(vget_high_s8(ll), vget_high_s8(mult[pp])));
              const int16x8_t ph = vpaddq_s16(vmull_s8(vget_low_s8(hh), vget_low_s8(mult[pp])),
                                              vmull_s8(vget_high_s8(hh), vget_high_s8(mult[pp])));
              acc[r][L] = vaddq_s16(acc[r][L], vaddq_s16(pl, ph));
            }
      }
      for (int r = 0; r < kSub; ++r)
        for (int L = 0; L < 2; ++L) {
          int16_t v[8];
          vst1q_s16(v, acc[r][L]);
          for (int i = 0; i < 8; ++i) acc32[r][8 * L + i] += v[i];
        }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < kSub; ++r)
      epilogue_scalar(acc32[r], 1, tscale[g], gsum[g], cf + r * 16, cf + (kSub + r) * 16, y + r * kSubRows);
    w += geo.coef_bytes();
  }
}
#endif  // NEON

using TileFn = void (*)(const uint8_t*, const int8_t*, const float*, const float*, const Geometry&, float*);

static TileFn pick_tile_fn(const Geometry& geo, bool simd) {
#if defined(HFE_LUT_X86)
  if (simd) {
    if (!geo.codes) {
      if (geo.bits == 2) return &tile_bitserial_avx2<1, false>;
      return geo.bits == 3 ? &tile_bitserial_avx2<1, true> : &tile_bitserial_avx2<2, false>;
    }
    return geo.channels == 1 ? &tile_codes_avx2<1> : &tile_codes_avx2<2>;
  }
#elif defined(HFE_LUT_NEON)
  // Code-indexed formats and 3-bit INT run the scalar engine on ARM.
  if (simd && !geo.codes && !geo.odd_plane)
    return geo.plane_pairs == 1 ? &tile_bitserial_neon<1> : &tile_bitserial_neon<2>;
#endif
  (void)simd;
  return &tile_scalar;
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
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<float> xp(static_cast<size_t>(geo.Kp), 0.0f);
    std::vector<float> ft(static_cast<size_t>(geo.channels * (geo.G / geo.slot) * 16));
    for (int64_t m = b; m < e; ++m) {
      std::memcpy(xp.data(), px + m * geo.K, sizeof(float) * geo.K);
      int8_t* tm = tab + m * geo.channels * geo.slots * 16;
#if defined(HFE_LUT_X86)
      if (avx2 && !geo.codes) {
        build_bitserial_avx2(xp.data(), geo, ft.data(), tm, ts + m * geo.ng, gs + m * geo.ng);
        continue;
      }
      if (avx2) {
        build_codes_avx2(xp.data(), geo, coeffs.data(), ft.data(), tm, ts + m * geo.ng, gs + m * geo.ng);
        continue;
      }
#endif
      build_tables_scalar(xp.data(), geo, coeffs.data(), ft.data(), tm, ts + m * geo.ng, gs + m * geo.ng);
    }
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lut_tables(const at::Tensor& x, const c10::optional<at::Tensor>& grid,
                                                          int64_t bits, int64_t group_size, bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, 1);
  Tables t = make_tables(x.contiguous(), geo, grid, use_simd(force_scalar));
  return {t.tab, t.tscale, t.gsum};
}

at::Tensor lut_gemm(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& grid,
                    int64_t bits, int64_t group_size, int64_t out_features, bool force_scalar) {
  const Geometry geo = checked_geometry(x, grid, bits, group_size, out_features);
  check_weights(geo, qweight);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = geo.N;
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0) return out;
  const bool simd = use_simd(force_scalar);
  Tables t = make_tables(xc, geo, grid, simd);
  const TileFn fn = pick_tile_fn(geo, simd);
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const int8_t* tab = t.tab.data_ptr<int8_t>();
  const float *ts = t.tscale.data_ptr<float>(), *gs = t.gsum.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t tb = geo.tile_bytes(), tab_stride = geo.channels * geo.slots * 16;
  at::parallel_for(0, geo.NT, 1, [&](int64_t b, int64_t e) {
    alignas(32) float y[kTileN];
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

std::string lut_isa(bool force_scalar) { return use_simd(force_scalar) ? simd_name() : "scalar"; }

}  // namespace lut
}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("lut_gemm(Tensor x, Tensor qweight, Tensor? grid, int bits, int group_size, int out_features, "
        "bool force_scalar=False) -> Tensor");
  m.def("lut_tables(Tensor x, Tensor? grid, int bits, int group_size, bool force_scalar=False) -> (Tensor, Tensor, Tensor)");
  m.def("lut_isa(bool force_scalar=False) -> str", &hf_efficient::lut::lut_isa);
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("lut_gemm", &hf_efficient::lut::lut_gemm);
  m.impl("lut_tables", &hf_efficient::lut::lut_tables);
}
