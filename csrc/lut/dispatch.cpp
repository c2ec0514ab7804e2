// Run-time engine choice: the best ISA the CPU has (cpuid on x86) and this build has an engine for, per
// geometry (an ISA without a kernel for a geometry hands it to the next one down).
#include "engine.h"

namespace hf_efficient {
namespace lut {

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    return avx2 ? Isa::kAvx2 : Isa::kScalar;
  }();
  return isa;
#elif defined(__aarch64__) && defined(__ARM_NEON)
  return Isa::kNeon;
#else
  return Isa::kScalar;
#endif
}

Engine select_engine(const Geometry& geo, Isa cap) {
  Engine e;
  e.tile = &tile_scalar;
  e.build = &build_tables_scalar;
  e.dequant = &dequant_scalar;
  e.isa = Isa::kScalar;
  if (cap == Isa::kScalar) return e;
#if defined(__x86_64__) || defined(__i386__)
  Engine a;
  if (avx2_engine(geo, &a)) {
    e.tile = a.tile;
    e.build = a.build;
    e.isa = Isa::kAvx2;
  }
  if (cap == Isa::kAvx512) {
    Engine b;
    const bool tiles = avx512_engine(geo, &b);
    if (b.dequant) e.dequant = b.dequant;
    if (tiles) {
      e.tile = b.tile;
      e.isa = Isa::kAvx512;
    }
  }
#elif defined(__aarch64__) && defined(__ARM_NEON)
  Engine n;
  if (neon_engine(geo, &n)) {
    e.tile = n.tile;
    e.isa = Isa::kNeon;
  }
#endif
  return e;
}

}  // namespace lut
}  // namespace hf_efficient
