// Stand-alone check of a LUT engine against the scalar engine, bit for bit, without torch: built by
// tests/test_neon.py with a cross-compiler and run under qemu-user (AArch64: the NEON engine), or natively.
//
// For every geometry in the list it fills a weight stream with random code bytes and random finite fp16
// coefficients, builds the tables of random activations with the scalar builder and with the engine's
// builder, runs every tile with the scalar kernel and with the engine's kernel, dequantizes with both, and
// compares all outputs with memcmp. Prints one line per case and "engine_check: N cases OK (isa)" at the
// end; exits 1 on the first mismatch.
//
// Build: g++ -O2 -std=c++17 -I csrc/lut csrc/lut/tools/engine_check.cpp csrc/lut/{scalar,dispatch,avx2,avx512,neon}.cpp
#include "../engine.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace hf_efficient::lut;

namespace {

uint16_t float_to_half_rne(float f) {  // finite, normal-range inputs only (what the generator makes)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t man = x & 0x7FFFFFu;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rest = man & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

struct Case {
  int64_t K, N, bits, G, channels;
  bool codes;
};

bool run_case(const Case& c, std::mt19937& rng, Isa isa) {
  Geometry geo;
  const std::string err = make_geometry(c.K, c.N, c.bits, c.G, c.codes, c.channels, &geo);
  if (!err.empty()) {
    std::printf("bad case: %s\n", err.c_str());
    return false;
  }
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> w(static_cast<size_t>(geo.NT * geo.tile_bytes()));
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  // Coefficient blocks: finite fp16 (coef in [0.5, 1.5) with random sign, zmul a small integer).
  for (int64_t t = 0; t < geo.NT; ++t)
    for (int64_t g = 0; g < geo.ng; ++g) {
      const int64_t steps_before = g * geo.G / geo.step_k();
      uint8_t* cb = w.data() + t * geo.tile_bytes() + (steps_before + geo.steps(g)) * geo.step_bytes() +
                    g * geo.coef_bytes();
      uint16_t* cf = reinterpret_cast<uint16_t*>(cb);
      const int64_t ncoef = kSub * geo.channels * 16;
      for (int64_t i = 0; i < ncoef; ++i) cf[i] = float_to_half_rne((normal(rng) > 0 ? 1 : -1) * (0.5f + std::fabs(normal(rng)) / 4));
      for (int64_t i = 0; i < kSub * 16; ++i) cf[ncoef + i] = float_to_half_rne(static_cast<float>(byte(rng) % 31 - 15));
    }
  std::vector<float> grid(static_cast<size_t>(geo.channels << geo.bits));
  for (auto& v : grid) v = normal(rng);
  std::vector<float> xp(static_cast<size_t>(geo.Kp), 0.0f);
  for (int64_t k = 0; k < geo.K; ++k) xp[k] = normal(rng) * (k % 37 == 0 ? 100.0f : 1.0f);

  const Engine ref = select_engine(geo, Isa::kScalar), eng = select_engine(geo, isa);
  const std::vector<float> coeffs = table_coeffs(geo, geo.codes ? grid.data() : nullptr);
  std::vector<float> ft(static_cast<size_t>(geo.channels * (geo.G / geo.slot) * 16));
  std::vector<int8_t> tab_r(static_cast<size_t>(geo.table_stride())), tab_e(tab_r.size());
  std::vector<float> ts_r(geo.ng), gs_r(geo.ng), ts_e(geo.ng), gs_e(geo.ng);
  ref.build(xp.data(), geo, coeffs.data(), ft.data(), tab_r.data(), ts_r.data(), gs_r.data());
  eng.build(xp.data(), geo, coeffs.data(), ft.data(), tab_e.data(), ts_e.data(), gs_e.data());
  bool ok = tab_r == tab_e && std::memcmp(ts_r.data(), ts_e.data(), 4 * geo.ng) == 0 &&
            std::memcmp(gs_r.data(), gs_e.data(), 4 * geo.ng) == 0;
  int64_t bad_tiles = 0;
  for (int64_t t = 0; t < geo.NT; ++t) {
    float yr[kTileN], ye[kTileN];
    ref.tile(w.data() + t * geo.tile_bytes(), tab_r.data(), ts_r.data(), gs_r.data(), geo, yr);
    eng.tile(w.data() + t * geo.tile_bytes(), tab_r.data(), ts_r.data(), gs_r.data(), geo, ye);
    bad_tiles += std::memcmp(yr, ye, sizeof yr) != 0;
  }
  std::vector<float> dr(static_cast<size_t>(geo.NT * kTileN * geo.K)), de(dr.size());
  ref.dequant(w.data(), grid.data(), geo, 0, geo.NT, dr.data(), geo.K);
  eng.dequant(w.data(), grid.data(), geo, 0, geo.NT, de.data(), geo.K);
  const bool deq_ok = std::memcmp(dr.data(), de.data(), dr.size() * 4) == 0;
  ok = ok && bad_tiles == 0 && deq_ok;
  std::printf("%s K=%lld N=%lld bits=%lld G=%lld %s ch=%lld engine=%s: tables %s, tiles %lld/%lld differ, dequant %s\n",
              ok ? "ok  " : "FAIL", static_cast<long long>(c.K), static_cast<long long>(c.N),
              static_cast<long long>(c.bits), static_cast<long long>(c.G), c.codes ? "code-indexed" : "bit-serial",
              static_cast<long long>(geo.channels), isa_name(eng.isa), tab_r == tab_e ? "equal" : "DIFFER",
              static_cast<long long>(bad_tiles), static_cast<long long>(geo.NT), deq_ok ? "equal" : "DIFFERS");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Isa isa = detect_isa();
  if (argc > 1 && !parse_isa(argv[1], &isa)) {
    std::printf("unknown isa %s\n", argv[1]);
    return 2;
  }
  std::mt19937 rng(1234);
  const Case cases[] = {
      {200, 37, 2, 32, 1, false},  {576, 70, 4, 128, 1, false}, {136, 33, 3, 64, 1, false},
      {4096, 64, 2, 128, 1, false}, {2048, 40, 4, 2048, 1, false}, {260, 50, 4, 128, 2, true},
      {200, 37, 2, 32, 1, true},   {48, 5, 1, 16, 2, true},     {576, 64, 3, 64, 2, true},
  };
  int n = 0;
  for (const Case& c : cases) {
    if (!run_case(c, rng, isa)) return 1;
    ++n;
  }
  std::printf("engine_check: %d cases OK (%s vs scalar)\n", n, isa_name(isa));
  return 0;
}
