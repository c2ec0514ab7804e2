// T-MAC-style LUT GEMV/GEMM engines: packed layouts, geometry and the engine interface.
//
// This header and the engine sources under csrc/lut/ depend on nothing but the C++ standard library (no
// ATen), so the same engines build into the torch extension and into a stand-alone driver that a
// cross-compiler targets (tests/test_neon.py runs the AArch64 build under qemu-user against the scalar
// engine). The torch ops live in csrc/lut_gemm.cpp.
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
// tscale_g the table scale and gsum_g the sum of the group's activations. The weight a row holds is
//   bit-serial: w = coef * (2c - (2^bits - 1)) + coef * zmul;  code-indexed: w = sum_ch coef_ch * grid_ch[c].
// Keeping codes and coefficients in one sequential stream per tile lets the hardware prefetcher run ahead
// on a single stream.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

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
  int64_t table_stride() const { return channels * slots * 16; }  // int8 table bytes per activation row
};

// Fills a Geometry; returns an empty string or the reason the arguments are invalid.
std::string make_geometry(int64_t K, int64_t N, int64_t bits, int64_t group_size, bool codes, int64_t channels,
                          Geometry* out);

// One tile (kTileN rows) of one activation row: y[0..32) = rows of the tile.
using TileFn = void (*)(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum,
                        const Geometry& geo, float* y);
// Tables of one activation row. xp: activations zero-padded to Kp; coeffs: table_coeffs(); ft: float
// scratch of channels * (G / slot) * 16; tab: int8 [channels][slots][16]; tscale, gsum: [ng].
using BuildFn = void (*)(const float* xp, const Geometry& geo, const float* coeffs, float* ft, int8_t* tab,
                         float* tscale, float* gsum);
// Dequantizes tiles [t0, t1) into rows (t1 - t0) * kTileN of ld floats (the first K columns are written).
using DequantFn = void (*)(const uint8_t* w, const float* grid, const Geometry& geo, int64_t t0, int64_t t1,
                           float* out, int64_t ld);

enum class Isa : int { kScalar = 0, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };

struct Engine {
  TileFn tile = nullptr;
  BuildFn build = nullptr;
  DequantFn dequant = nullptr;
  Isa isa = Isa::kScalar;  // the engine that runs the tiles (tables and dequantization may use a lower one)
};

const char* isa_name(Isa isa);
// Parses "scalar" / "neon" / "avx2" / "avx512"; false if unknown.
bool parse_isa(const std::string& s, Isa* out);
// The best ISA this CPU runs and this build has an engine for (x86: cpuid at run time).
Isa detect_isa();
// The engine for geo using ISAs up to `cap` (a geometry an ISA has no kernel for falls back to the next).
Engine select_engine(const Geometry& geo, Isa cap);

// Shared pieces (scalar.cpp).
std::vector<float> table_coeffs(const Geometry& geo, const float* grid);
float half_to_float(uint16_t h);
void build_tables_scalar(const float* xp, const Geometry& geo, const float* coeffs, float* ft, int8_t* tab,
                         float* tscale, float* gsum);
void tile_scalar(const uint8_t* w, const int8_t* tab, const float* tscale, const float* gsum, const Geometry& geo,
                 float* y);
void dequant_scalar(const uint8_t* w, const float* grid, const Geometry& geo, int64_t t0, int64_t t1, float* out,
                    int64_t ld);
// Codes of tile t: codes[row * Kp + k] for the kTileN rows of the tile (inverse of the packing).
void tile_codes(const uint8_t* w, const Geometry& geo, int64_t t, uint8_t* codes);
// Per row of a tile and group: the 16 weight values of codes 0..15 (unused codes 0), [kTileN][16].
void group_values(const uint8_t* coef_block, const float* grid, const Geometry& geo, float* vals);

// fp16-weight matmul (half.cpp), for float tables kept in half precision. rows: y[m * ldy + n] =
// sum_k x[m * K + k] * float(w[n * K + k]) for m < M, n in [n0, n1) (x: M rows of K floats, w: half rows of K);
// widen: count halves to floats (the GEMM path's row blocks).
struct HalfEngine {
  void (*rows)(const float* x, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
               int64_t ldy) = nullptr;
  void (*widen)(const uint16_t* w, int64_t count, float* out) = nullptr;
  Isa isa = Isa::kScalar;
};
HalfEngine select_half_engine(Isa cap);

// Per-ISA engines: each fills the entries it has for geo and returns false if it has none (or was not built).
bool avx2_engine(const Geometry& geo, Engine* e);
bool avx512_engine(const Geometry& geo, Engine* e);
bool neon_engine(const Geometry& geo, Engine* e);

}  // namespace lut
}  // namespace hf_efficient
