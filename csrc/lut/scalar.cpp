// The portable engine and the pieces every engine shares: geometry, table coefficients, the scalar table
// builder (the rounding reference of the SIMD builders), the scalar tile kernel (same integer sums as the
// SIMD kernels, which never overflow), and the inverse of the packing (codes and dequantized rows).
#include "engine.h"
#include "engine_inl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace hf_efficient {
namespace lut {

std::string make_geometry(int64_t K, int64_t N, int64_t bits, int64_t group_size, bool codes, int64_t channels,
                          Geometry* out) {
  if (bits < 1 || bits > 4) return "lut: bits must be 1, 2, 3 or 4, got " + std::to_string(bits);
  if (!codes && bits < 2)
    return "lut: the bit-serial engine needs bits >= 2 (1-bit weights use the code-indexed engine: pass a grid), "
           "got bits=" + std::to_string(bits);
  if (group_size <= 0 || group_size % kKAlign != 0)
    return "lut: group_size must be a positive multiple of 16, got " + std::to_string(group_size);
  if (K <= 0 || N <= 0)
    return "lut: in_features and out_features must be positive, got K=" + std::to_string(K) + " N=" + std::to_string(N);
  if (channels < 1 || channels > kMaxChannels)
    return "lut: grid must have 1 or 2 rows (channels), got " + std::to_string(channels);
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
  *out = g;
  return "";
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon";
    default: return "scalar";
  }
}

bool parse_isa(const std::string& s, Isa* out) {
  for (Isa i : {Isa::kScalar, Isa::kNeon, Isa::kAvx2, Isa::kAvx512})
    if (s == isa_name(i)) {
      *out = i;
      return true;
    }
  return false;
}

// IEEE binary16 -> binary32 (exact), written out so the engines need no ATen/c10 header.
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Per-position coefficient vectors: T[idx] = sum_i coeffs[ch][i][idx] * a_i, summed in order of i
// (bit-serial: coeffs are the signs +-1, products exact; code-indexed: grid values of code i of idx).
std::vector<float> table_coeffs(const Geometry& geo, const float* grid) {
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

void build_tables_scalar(const float* xp, const Geometry& geo, const float* coeffs, float* ft, int8_t* tab,
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

void epilogue_scalar(const int32_t* acc, int64_t channels, float ts, float gs, const uint16_t* coef,
                     const uint16_t* zmul, float* y) {
  for (int64_t ch = 0; ch < channels; ++ch)
    for (int r = 0; r < kSubRows; ++r)
      y[r] = std::fma(static_cast<float>(acc[ch * 16 + r]) * ts, half_to_float(coef[ch * 16 + r]), y[r]);
  for (int r = 0; r < kSubRows; ++r) y[r] = std::fma(gs, half_to_float(coef[r]) * half_to_float(zmul[r]), y[r]);
}

void tile_scalar(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum, const Geometry& geo,
                 float* y) {
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
// The inverse of the packing: codes and dequantized rows (prefill GEMM, checkpoints, tests)
// ---------------------------------------------------------------------------------------------------
// Byte b of kSpread[n] is bit b of n: one OR places a plane bit of 4 consecutive codes.
static constexpr uint32_t spread(int n) {
  return (n & 1) | ((n >> 1) & 1) << 8 | ((n >> 2) & 1) << 16 | static_cast<uint32_t>((n >> 3) & 1) << 24;
}
static constexpr uint32_t kSpread[16] = {spread(0), spread(1), spread(2),  spread(3),  spread(4),  spread(5),
                                         spread(6), spread(7), spread(8),  spread(9),  spread(10), spread(11),
                                         spread(12), spread(13), spread(14), spread(15)};

static inline void or_plane(uint8_t* c, int nib, int plane) {
  uint32_t v;
  std::memcpy(&v, c, 4);
  v |= kSpread[nib] << plane;
  std::memcpy(c, &v, 4);
}

void tile_codes(const uint8_t* w, const Geometry& geo, int64_t t, uint8_t* codes) {
  w += t * geo.tile_bytes();
  std::memset(codes, 0, static_cast<size_t>(kTileN * geo.Kp));
  const int64_t Kp = geo.Kp;
  int64_t slot = 0;
  for (int64_t g = 0; g < geo.ng; ++g) {
    const int64_t steps = geo.steps(g);
    for (int64_t st = 0; st < steps; ++st) {
      if (!geo.codes) {
        for (int64_t r = 0; r < kSub; ++r)
          for (int64_t pp = 0; pp < geo.plane_pairs; ++pp, w += 32)
            for (int i = 0; i < 32; ++i) {
              const int p = i % 16, row = static_cast<int>(16 * r) + (i / 16) * 8 + p / 2;
              uint8_t* c = codes + row * Kp + 4 * slot;
              or_plane(c, w[i] & 15, static_cast<int>(2 * pp) + p % 2);
              or_plane(c + 4, w[i] >> 4, static_cast<int>(2 * pp) + p % 2);
            }
        if (geo.odd_plane) {
          for (int i = 0; i < 32; ++i) {
            uint8_t* c = codes + i * Kp + 4 * slot;
            or_plane(c, w[i] & 15, static_cast<int>(geo.bits - 1));
            or_plane(c + 4, w[i] >> 4, static_cast<int>(geo.bits - 1));
          }
          w += 32;
        }
        slot += 2;
      } else if (geo.slot == 1) {  // one code per nibble (4 bits): four bytes per row, no inner loops
        for (int64_t r = 0; r < kSub; ++r, w += 32)
          for (int i = 0; i < 16; ++i) {
            uint8_t* c = codes + (16 * r + i) * Kp + slot;
            c[0] = w[i] & 15, c[1] = w[i + 16] & 15, c[2] = w[i] >> 4, c[3] = w[i + 16] >> 4;
          }
        slot += 4;
      } else {
        const int mask = (1 << geo.bits) - 1;
        for (int64_t r = 0; r < kSub; ++r, w += 32)
          for (int i = 0; i < 32; ++i) {
            const int L = i / 16, row = static_cast<int>(16 * r) + i % 16;
            for (int half = 0; half < 2; ++half) {
              const int nib = half ? w[i] >> 4 : w[i] & 15;
              uint8_t* c = codes + row * Kp + geo.slot * (slot + L + 2 * half);
              for (int64_t b = 0; b < geo.slot; ++b) c[b] = static_cast<uint8_t>((nib >> (geo.bits * b)) & mask);
            }
          }
        slot += 4;
      }
    }
    w += geo.coef_bytes();
  }
}

void group_values(const uint8_t* coef_block, const float* grid, const Geometry& geo, float* vals) {
  const uint16_t* cf = reinterpret_cast<const uint16_t*>(coef_block);
  const int64_t nv = int64_t(1) << geo.bits;
  for (int64_t r = 0; r < kSub; ++r)
    for (int q = 0; q < kSubRows; ++q) {
      float* v = vals + (r * kSubRows + q) * 16;
      std::fill(v, v + 16, 0.0f);
      const float c0 = half_to_float(cf[(r * geo.channels) * 16 + q]);
      if (!geo.codes) {
        // w = coef * (2c - (2^b - 1) + zmul): the bracket is a small integer (exact), and coef = scale / 2,
        // so the product equals the reference's scale * (c + off - z) bit for bit.
        const float zm = half_to_float(cf[kSub * geo.channels * 16 + r * 16 + q]);
        for (int64_t c = 0; c < nv; ++c) v[c] = c0 * (static_cast<float>(2 * c - (nv - 1)) + zm);
      } else {
        // the other channels' coefficients converted once per row, not once per value (same products and sums)
        float cv[kMaxChannels] = {c0};
        for (int64_t ch = 1; ch < geo.channels; ++ch) cv[ch] = half_to_float(cf[(r * geo.channels + ch) * 16 + q]);
        for (int64_t c = 0; c < nv; ++c) {
          float s = c0 * grid[c];
          for (int64_t ch = 1; ch < geo.channels; ++ch) s += cv[ch] * grid[ch * nv + c];
          v[c] = s;
        }
      }
    }
}

// Offset of group g's coefficient block inside a tile's stream.
int64_t coef_offset(const Geometry& geo, int64_t g) {
  const int64_t steps_before = g * geo.G / geo.step_k();
  return (steps_before + geo.steps(g)) * geo.step_bytes() + g * geo.coef_bytes();
}

void dequant_scalar(const uint8_t* w, const float* grid, const Geometry& geo, int64_t t0, int64_t t1, float* out,
                    int64_t ld) {
  std::vector<uint8_t> codes(static_cast<size_t>(kTileN * geo.Kp));
  float vals[kTileN * 16];
  for (int64_t t = t0; t < t1; ++t) {
    tile_codes(w, geo, t, codes.data());
    const uint8_t* base = w + t * geo.tile_bytes();
    for (int64_t g = 0; g < geo.ng; ++g) {
      group_values(base + coef_offset(geo, g), grid, geo, vals);
      const int64_t k0 = g * geo.G, k1 = std::min(geo.K, k0 + geo.group_len(g));
      for (int64_t row = 0; row < kTileN; ++row) {
        float* o = out + ((t - t0) * kTileN + row) * ld;
        const uint8_t* c = codes.data() + row * geo.Kp;
        const float* v = vals + row * 16;
        for (int64_t k = k0; k < k1; ++k) o[k] = v[c[k]];
      }
    }
  }
}

}  // namespace lut
}  // namespace hf_efficient
