// AVX2 engine (x86): bit-serial and code-indexed tile kernels and table builders. Every function carries
// a target attribute instead of the file being compiled with -mavx2, so one build runs on any x86 CPU and
// no AVX2 instruction leaks into shared inline code; dispatch.cpp picks it only where cpuid reports
// AVX2+FMA+F16C. The results equal the scalar engine's bit for bit (tests/test_lut.py).
#include "engine.h"
#include "engine_inl.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace hf_efficient {
namespace lut {

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

static void build_bitserial_avx2_fn(const float* xp, const Geometry& geo, const float*, float* ft, int8_t* tab,
                                    float* tscale, float* gsum) {
  build_bitserial_avx2(xp, geo, ft, tab, tscale, gsum);
}

bool avx2_engine(const Geometry& geo, Engine* e) {
  if (!geo.codes) {
    e->tile = geo.bits == 2   ? &tile_bitserial_avx2<1, false>
              : geo.bits == 3 ? &tile_bitserial_avx2<1, true>
                              : &tile_bitserial_avx2<2, false>;
    e->build = &build_bitserial_avx2_fn;
  } else {
    e->tile = geo.channels == 1 ? &tile_codes_avx2<1> : &tile_codes_avx2<2>;
    e->build = &build_codes_avx2;
  }
  e->isa = Isa::kAvx2;
  return true;
}

}  // namespace lut
}  // namespace hf_efficient

#else  // not x86

namespace hf_efficient {
namespace lut {
bool avx2_engine(const Geometry&, Engine*) { return false; }
}  // namespace lut
}  // namespace hf_efficient

#endif
