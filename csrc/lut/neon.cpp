// NEON engine (AArch64): the bit-serial tile kernel with tbl lookups. Tables are built by the scalar
// builder and code-indexed formats and 3-bit INT run the scalar tiles. Its results equal the scalar
// engine's bit for bit; tests/test_neon.py checks that under qemu-user with a cross-compiled driver
// (csrc/lut/tools/engine_check.cpp), since the project's CI is x86.
#include "engine.h"
#include "engine_inl.h"

#include <algorithm>

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>

namespace hf_efficient {
namespace lut {

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

bool neon_engine(const Geometry& geo, Engine* e) {
  if (geo.codes || geo.odd_plane) return false;
  e->tile = geo.plane_pairs == 1 ? &tile_bitserial_neon<1> : &tile_bitserial_neon<2>;
  e->isa = Isa::kNeon;
  return true;
}

}  // namespace lut
}  // namespace hf_efficient

#else

namespace hf_efficient {
namespace lut {
bool neon_engine(const Geometry&, Engine*) { return false; }
}  // namespace lut
}  // namespace hf_efficient

#endif
