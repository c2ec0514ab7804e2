// Internal helpers shared by the engine sources (not part of the engine interface).
#pragma once
#include "engine.h"

namespace hf_efficient {
namespace lut {

// Group sums in a fixed order all builders share: 8 interleaved partial sums, combined pairwise.
inline float combine8(const float* p) { return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])); }

// Per-group epilogue of one subtile, shared by all engines (scalar form; the SIMD forms compute the same
// expression in the same order). acc: int32 [channels][16]; coef: fp16 [channels][16], zmul: fp16 [16].
void epilogue_scalar(const int32_t* acc, int64_t channels, float ts, float gs, const uint16_t* coef,
                     const uint16_t* zmul, float* y);

// Offset of group g's fp16 coefficient block inside a tile's stream.
int64_t coef_offset(const Geometry& geo, int64_t g);

}  // namespace lut
}  // namespace hf_efficient
