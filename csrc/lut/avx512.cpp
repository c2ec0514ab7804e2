// AVX-512 engine (x86 with AVX-512 F/BW/VL): the AVX2 loops on 64-byte vectors. The 16-entry tables are
// replicated into all four 128-bit lanes (vbroadcasti32x4), so one vpshufb looks up 64 weight bytes:
//   bit-serial, 1 plane pair (INT2): the step's 64 code bytes are both subtiles, one accumulator;
//   bit-serial, 2 plane pairs (INT4): one subtile's two plane pairs per vector, per-lane multipliers
//     (2^0, 2^1 | 2^2, 2^3); the two 256-bit halves (same rows, other planes) are folded per group;
//   code-indexed (FP/NF, one or two channels): both subtiles per vector, the 32-byte table pair
//     broadcast to both halves.
// Half the instructions per weight of the AVX2 engine; results equal the scalar engine's bit for bit
// (same int32 sums, same fma epilogue per row). Odd bits (INT3) keep the AVX2 engine. The dequantizer
// (prefill GEMM) looks a row's 16 values up with vpermps. Every function carries a target attribute, so
// one build runs on CPUs without AVX-512; dispatch.cpp picks this engine where cpuid reports it.
//
// VNNI (vpdpbusd) is not used: it sums four adjacent bytes, and in the packed layout adjacent lookup bytes
// belong to different rows (the layout pairs planes of one row, which is what vpmaddubsw needs); regrouping
// them costs an unpack per vector, as many instructions as the vpmaddubsw + vpaddw it would replace.
#include "engine.h"
#include "engine_inl.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's own AVX-512 intrinsic headers trip -Wmaybe-uninitialized (their _mm512_undefined_* idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace hf_efficient {
namespace lut {

#define HFE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// Same distance as the AVX2 engine (see there); the stream is read at twice the rate per instruction.
constexpr int64_t kPrefetch512 = 8192;

HFE_AVX512 static inline void prefetch512(const uint8_t* w) {
  _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch512, _MM_HINT_T1);
}

HFE_AVX512 static inline __m512 load_half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

HFE_AVX512 static inline __m512i table4(const int8_t* t) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

// y = fma(float(acc_ch) * ts, coef_ch, y) per channel, then fma(gs, coef_0 * zmul, y): the scalar epilogue.
HFE_AVX512 static inline __m512 epilogue512(const __m512i* acc, int channels, float ts, float gs,
                                            const uint16_t* coef, const uint16_t* zmul, __m512 y) {
  const __m512 vts = _mm512_set1_ps(ts);
  for (int ch = 0; ch < channels; ++ch)
    y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[ch]), vts), load_half16(coef + ch * 16), y);
  return _mm512_fmadd_ps(_mm512_set1_ps(gs), _mm512_mul_ps(load_half16(coef), load_half16(zmul)), y);
}

// Bit-serial, PP plane pairs (1 or 2); bits = 2 * PP.
template <int PP>
HFE_AVX512 static void tile_bitserial_avx512(const uint8_t* w, const int8_t* tab, const float* tscale,
                                             const float* gsum, const Geometry& geo, float* y) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // PP = 1: both halves plane pair 0; PP = 2: low half plane pair 0, high half plane pair 1.
  const __m512i mult = PP == 1 ? _mm512_set1_epi16(0x0201)
                               : _mm512_inserti64x4(_mm512_set1_epi16(0x0201), _mm256_set1_epi16(0x0804), 1);
  const int64_t chunk = 32767 / (2 * ((1 << geo.bits) - 1) * 127);  // int16 headroom, as in the AVX2 engine
  __m512 yv[kSub];
  for (int r = 0; r < kSub; ++r) yv[r] = _mm512_setzero_ps();
  const int8_t* t = tab;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    __m512i acc32[kSub];
    for (int r = 0; r < kSub; ++r) acc32[r] = _mm512_setzero_si512();
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
      const int64_t c1 = std::min(steps, c0 + chunk);
      __m512i acc[PP == 1 ? 1 : kSub];
      for (auto& a : acc) a = _mm512_setzero_si512();
      for (int64_t st = c0; st < c1; ++st, t += 32) {
        const __m512i tl = table4(t), th = table4(t + 16);
        for (int v = 0; v < (PP == 1 ? 1 : kSub); ++v, w += 64) {
          prefetch512(w);
          const __m512i W = _mm512_loadu_si512(w);
          const __m512i lo = _mm512_and_si512(W, nib);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(W, 4), nib);
          acc[v] = _mm512_add_epi16(acc[v], _mm512_maddubs_epi16(mult, _mm512_shuffle_epi8(tl, lo)));
          acc[v] = _mm512_add_epi16(acc[v], _mm512_maddubs_epi16(mult, _mm512_shuffle_epi8(th, hi)));
        }
      }
      if (PP == 1) {  // low half: subtile 0 rows 0..15 in order, high half: subtile 1
        acc32[0] = _mm512_add_epi32(acc32[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(acc[0])));
        acc32[1] = _mm512_add_epi32(acc32[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(acc[0], 1)));
      } else {  // halves: the same 16 rows, plane pairs 0 and 1; both fit int16 together (chunk bound)
        for (int r = 0; r < kSub; ++r) {
          const __m256i s = _mm256_add_epi16(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
          acc32[r] = _mm512_add_epi32(acc32[r], _mm512_cvtepi16_epi32(s));
        }
      }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < kSub; ++r)
      yv[r] = epilogue512(&acc32[r], 1, tscale[g], gsum[g], cf + r * 16, cf + (kSub + r) * 16, yv[r]);
    w += geo.coef_bytes();
  }
  for (int r = 0; r < kSub; ++r) _mm512_storeu_ps(y + r * kSubRows, yv[r]);
}

// Code-indexed, P channels. One vector = both subtiles' 32 bytes; 128-bit lane j: subtile j / 2, slot
// parity L = j % 2 (table of slot s+L for the low nibble, s+2+L for the high nibble).
template <int P>
HFE_AVX512 static void tile_codes_avx512(const uint8_t* w, const int8_t* tab, const float* tscale,
                                         const float* gsum, const Geometry& geo, float* y) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t chunk = 128;  // each step adds at most 2 * 127 per int16 lane
  __m512 yv[kSub];
  for (int r = 0; r < kSub; ++r) yv[r] = _mm512_setzero_ps();
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    // Per channel: rows 0..7 (lo) and 8..15 (hi) of each subtile, int32.
    __m256i lo32[kSub][P], hi32[kSub][P];
    for (int r = 0; r < kSub; ++r)
      for (int ch = 0; ch < P; ++ch) lo32[r][ch] = hi32[r][ch] = _mm256_setzero_si256();
    for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
      const int64_t c1 = std::min(steps, c0 + chunk);
      __m512i accA[P], accB[P];
      for (int ch = 0; ch < P; ++ch) accA[ch] = accB[ch] = _mm512_setzero_si512();
      for (int64_t st = c0; st < c1; ++st, slot += 4, w += 64) {
        prefetch512(w);
        const __m512i W = _mm512_loadu_si512(w);
        const __m512i lo = _mm512_and_si512(W, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(W, 4), nib);
        for (int ch = 0; ch < P; ++ch) {
          const int8_t* t = tab + (ch * geo.slots + slot) * 16;
          const __m512i T1 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)));
          const __m512i T2 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 32)));
          const __m512i l1 = _mm512_shuffle_epi8(T1, lo), l2 = _mm512_shuffle_epi8(T2, hi);
          accA[ch] = _mm512_add_epi16(accA[ch], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(l1, l2)));
          accB[ch] = _mm512_add_epi16(accB[ch], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(l1, l2)));
        }
      }
      for (int ch = 0; ch < P; ++ch)
        for (int r = 0; r < kSub; ++r) {
          // Lanes 2r and 2r+1 of accA hold rows 0..7 of subtile r for the two slot parities: fold them.
          const __m256i a = r == 0 ? _mm512_castsi512_si256(accA[ch]) : _mm512_extracti64x4_epi64(accA[ch], 1);
          const __m256i b = r == 0 ? _mm512_castsi512_si256(accB[ch]) : _mm512_extracti64x4_epi64(accB[ch], 1);
          lo32[r][ch] = _mm256_add_epi32(lo32[r][ch], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
          lo32[r][ch] = _mm256_add_epi32(lo32[r][ch], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
          hi32[r][ch] = _mm256_add_epi32(hi32[r][ch], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b)));
          hi32[r][ch] = _mm256_add_epi32(hi32[r][ch], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(b, 1)));
        }
    }
    const uint16_t* cf = reinterpret_cast<const uint16_t*>(w);
    for (int r = 0; r < kSub; ++r) {
      __m512i acc[P];
      for (int ch = 0; ch < P; ++ch) acc[ch] = _mm512_inserti64x4(_mm512_castsi256_si512(lo32[r][ch]), hi32[r][ch], 1);
      yv[r] = epilogue512(acc, P, tscale[g], gsum[g], cf + r * P * 16, cf + kSub * P * 16 + r * 16, yv[r]);
    }
    w += geo.coef_bytes();
  }
  for (int r = 0; r < kSub; ++r) _mm512_storeu_ps(y + r * kSubRows, yv[r]);
}

// Dequantization: codes by the scalar inverse of the packing, values by a 16-entry vpermps per row.
HFE_AVX512 static void dequant_avx512(const uint8_t* w, const float* grid, const Geometry& geo, int64_t t0,
                                      int64_t t1, float* out, int64_t ld) {
  std::vector<uint8_t> codes(static_cast<size_t>(kTileN * geo.Kp) + 16);
  alignas(64) float vals[kTileN * 16];
  for (int64_t t = t0; t < t1; ++t) {
    tile_codes(w, geo, t, codes.data());
    const uint8_t* base = w + t * geo.tile_bytes();
    for (int64_t g = 0; g < geo.ng; ++g) {
      group_values(base + coef_offset(geo, g), grid, geo, vals);
      const int64_t k0 = g * geo.G, k1 = std::min(geo.K, k0 + geo.group_len(g));
      for (int64_t row = 0; row < kTileN; ++row) {
        float* o = out + ((t - t0) * kTileN + row) * ld;
        const uint8_t* c = codes.data() + row * geo.Kp;
        const __m512 v = _mm512_load_ps(vals + row * 16);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
          const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
          _mm512_storeu_ps(o + k, _mm512_permutexvar_ps(idx, v));
        }
        if (k < k1) {
          const __mmask16 m = static_cast<__mmask16>((1u << (k1 - k)) - 1);
          const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
          _mm512_mask_storeu_ps(o + k, m, _mm512_permutexvar_ps(idx, v));
        }
      }
    }
  }
}

bool avx512_engine(const Geometry& geo, Engine* e) {
  e->dequant = &dequant_avx512;  // any geometry
  if (!geo.codes && geo.odd_plane) return false;  // INT3 tiles: the AVX2 engine
  if (!geo.codes) e->tile = geo.plane_pairs == 1 ? &tile_bitserial_avx512<1> : &tile_bitserial_avx512<2>;
  else e->tile = geo.channels == 1 ? &tile_codes_avx512<1> : &tile_codes_avx512<2>;
  e->isa = Isa::kAvx512;
  return true;
}

}  // namespace lut
}  // namespace hf_efficient

#else  // not x86

namespace hf_efficient {
namespace lut {
bool avx512_engine(const Geometry&, Engine*) { return false; }
}  // namespace lut
}  // namespace hf_efficient

#endif
