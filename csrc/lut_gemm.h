// T-MAC-style LUT GEMV/GEMM: shared definitions of the packed layouts and the geometry.
//
// Two table engines share tables, epilogue and threading (see docs/lut.md for why two):
//   bit-serial (INT, bits 2..4): a b-bit code is split into b one-bit planes; for each group of 4
//     activations a 16-entry table of signed sums T[idx] = sum_i (bit_i(idx) ? +a_i : -a_i) serves all
//     planes. Planes are paired in adjacent bytes so one vpmaddubsw applies the 2^j plane weights and
//     widens to int16 at once.
//   code-indexed (any grid, bits 1..4): the nibble index is the concatenation of the codes of
//     gp = 4 / bits (bits 3: 1) activations and T[idx] = sum_i grid[code_i(idx)] * a_i, so a
//     non-uniform grid (FP4, NF4, ...) is looked up exactly. Up to 2 "channels" of grids share one index
//     stream (AFPQ two scales: channel 0 = positive part, channel 1 = negative part).
// Tables are quantized to int8 with one scale per weight group (per activation row).
#pragma once
#include <cstdint>

namespace hf_efficient {
namespace lut {

constexpr int64_t kSubRows = 16;            // rows per subtile (one int16 ymm accumulator holds 16 rows)
constexpr int64_t kSub = 2;                 // subtiles per tile: they share every table load
constexpr int64_t kTileN = kSubRows * kSub; // output rows per tile (one sequential byte stream)
constexpr int64_t kKAlign = 16;             // in_features are zero-padded to a multiple of this
constexpr int kMaxChannels = 2;

struct Geometry {
  int64_t K = 0;      // in_features
  int64_t Kp = 0;     // padded in_features (multiple of kKAlign)
  int64_t N = 0;      // out_features
  int64_t NT = 0;     // row tiles
  int64_t G = 0;      // group size (multiple of kKAlign)
  int64_t ng = 0;     // groups = ceil(Kp / G)
  int64_t bits = 0;
  bool codes = false; // code-indexed engine (else bit-serial)
  int64_t channels = 1;
  int64_t slot = 4;   // activations per table
  int64_t slots = 0;  // Kp / slot
  int64_t plane_pairs = 0;  // bit-serial: full plane pairs, bits / 2
  bool odd_plane = false;   // bit-serial: bits is odd, the top plane is stored alone (32 rows per 32 bytes)

  int64_t group_len(int64_t g) const { return (g + 1) * G <= Kp ? G : Kp - g * G; }
  // Activations per step: a bit-serial step is a pair of slots, a code-indexed step 4 slots.
  int64_t step_k() const { return codes ? 4 * slot : 8; }
  int64_t steps(int64_t g) const { return group_len(g) / step_k(); }
  // Code bytes per step of one tile: 32 per subtile (code-indexed) or per subtile and plane pair, plus 32
  // for a lone top plane.
  int64_t step_bytes() const { return codes ? kSub * 32 : kSub * 32 * plane_pairs + (odd_plane ? 32 : 0); }
  // fp16 coefficients after each group: coef (kSub, channels, 16), then zmul (kSub, 16).
  int64_t coef_bytes() const { return kSub * kSubRows * (channels + 1) * 2; }
  int64_t tile_bytes() const { return Kp / step_k() * step_bytes() + ng * coef_bytes(); }
};

}  // namespace lut
}  // namespace hf_efficient
