// Mixed-input tensor-core matmul for low-bit weights: y (M, N) = x (M, K) @ W.T, W in the "mma" layout of
// kernels/quant_mma.py (read that docstring first: it defines the layout this file decodes).
//
// One warp owns a 16-row tile of W and runs mma.sync m16n8k16 with W as the A operand (16 rows x 16 K) and the
// activations as B (16 K x 8 rows of x), so M = 1..8 costs one MMA per 256 weights and larger M adds MMAs, not
// weight traffic. Every format decodes the same way: each thread's 128-bit chunk holds its fragment's codes in
// pair order, and a pair of codes indexes a pair table in shared memory whose entry is the two grid values as a
// half2/bfloat162 — exactly the A fragment register. The table is replicated once per lane (entry e of lane l at
// word e*32 + l), so the lookups of a warp never conflict on a bank (INT4 with a zero point at bfloat16 builds the
// register by arithmetic instead: IntDecode). Scales stay out of the inner loop: per group
// the fragment products accumulate unscaled (fp32), and at the group's end
//   sym:        acc += a * S(v)
//   zero point: acc += a * S(v - z)             (more than one M tile, groups of whole blocks: z subtracted from
//               each A register, FOLD below), else acc += a * (S(v) - z * S(1))   (S(1) = the sum of x over the
//               group: summed from the staged x once per CTA where groups are whole blocks, else one more MMA
//               with an all-ones A fragment)
//   two scales: acc += a * S(v) + (b - a) * S(min(v,0))   (= a S(v+) + b S(v-), one max/min per register)
// except at bfloat16 with more than one M tile and whole-block groups, where the scales multiply the A fragments
// before the MMAs (SCALE_A: one MMA per tile for every format, no per-group sums).
// Split-K: every split writes an fp32 partial tile to a workspace; the last split to arrive at a tile (atomic
// counter per tile, reset by that split) sums the partials and writes y. One launch per call.
#ifdef HFE_MMA_EMULATE
#include "quant_mma_emu.h"  // the same primitives on the CPU (tests)
#else
#include "quant_mma_ptx.cuh"
#endif
#include <stdint.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "quant_mma_args.h"

namespace hfe_mma {

constexpr int BLOCK_K = 128;       // K per chunk (8 MMA slices of 16)
constexpr int RING = 4;            // 128-K blocks of weights per warp in shared memory (RING - 1 in flight)

template <typename T> struct Pair;
template <> struct Pair<__half> { using T2 = __half2; };
template <> struct Pair<__nv_bfloat16> { using T2 = __nv_bfloat162; };

template <typename T>
__device__ __forceinline__ uint32_t hmin0(uint32_t v) {
  using T2 = typename Pair<T>::T2;
  T2 r = __hmin2(*reinterpret_cast<T2*>(&v), T2{});
  return *reinterpret_cast<uint32_t*>(&r);
}
// Both halves of a minus those of b (zero-point folding: see mma_slice).
template <typename T>
__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
  using T2 = typename Pair<T>::T2;
  T2 r = __hsub2(*reinterpret_cast<T2*>(&a), *reinterpret_cast<T2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Both halves of a times those of b (scaled A fragments: see SCALE_A).
template <typename T>
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  using T2 = typename Pair<T>::T2;
  T2 r = __hmul2(*reinterpret_cast<T2*>(&a), *reinterpret_cast<T2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// A thread's chunk: the codes of 16 pairs (pair p = slice p/2, half p%2) of one row, read from the warp's ring.
template <int BITS> struct Chunk;
template <> struct Chunk<4> {  // pair p = byte p
  uint4 w;
  __device__ __forceinline__ void load(uint32_t a) { w = lds128(a); }
  __device__ __forceinline__ uint32_t idx(int p) const {  // p is a constant after unrolling
    const uint32_t word = p < 4 ? w.x : p < 8 ? w.y : p < 12 ? w.z : w.w;
    return __byte_perm(word, 0, 0x4440 | (p & 3));
  }
};
template <> struct Chunk<2> {  // pair p = nibble p
  uint2 w;
  __device__ __forceinline__ void load(uint32_t a) { w = lds64(a); }
  // The word shifted so that pair p sits at bits 7..10 (its table entry's byte offset; see PairTable).
  __device__ __forceinline__ uint32_t at7(int p) const {
    const uint32_t word = p < 8 ? w.x : w.y;
    const int sh = 4 * (p & 7);
    return sh >= 7 ? word >> (sh - 7) : word << (7 - sh);
  }
};
template <> struct Chunk<3> {  // pair p = bits 6p .. 6p + 5 of the 96-bit chunk (words 0, 1, 2: low to high)
  uint32_t w[3];
  __device__ __forceinline__ void load(uint32_t a) {  // 12-byte chunks: not 8-byte aligned for odd lanes
    w[0] = lds32(a);
    w[1] = lds32(a + 4);
    w[2] = lds32(a + 8);
  }
  // The chunk's bits shifted so that pair p sits at bits 7..12 (the byte offset of its table entry; other bits are
  // left for the lookup's mask): one shift, a funnel shift where the pair straddles two words.
  __device__ __forceinline__ uint32_t at7(int p) const {  // p is a constant after unrolling
    const int lo = 6 * p, k = lo / 32, sh = lo % 32;
    if (sh + 6 > 32) return __funnelshift_r(w[k], w[k + 1], sh - 7);
    return sh >= 7 ? w[k] >> (sh - 7) : w[k] << (7 - sh);
  }
};

template <int BITS> __host__ __device__ constexpr int chunk_words() { return BITS == 4 ? 4 : BITS == 2 ? 2 : 3; }

// The 4-bit identity grid (v = c, INT4 with a zero point) with bfloat16 activations needs no table: pair p of a
// chunk (byte p = c0 | c1 << 4) becomes the A register (K0 + c0, K0 + c1), K0 = 128, by one byte permute and one
// and-or. The permute puts byte p of the word in byte 0 and byte p of the word >> 4 in byte 2; the mask keeps their
// low nibbles (c0, c1); the or adds the bits of bfloat16 128, whose last mantissa bits then hold the code exactly.
// A table lookup took a byte select, an address add and a shared load (and the CTA a 32 KB table). The zero-point
// flush takes K0 with the zero point: a (S(K0 + v) - (z + K0) S(1)) = a (S(v) - z S(1)); the fp32 sums then carry
// about 2**-24 (K0 + 15) sum |x| more rounding. float16 would need K0 = 1024, 8 times that, close to the output's
// own rounding, so float16 activations keep the table.
struct IntDecode {
  static constexpr uint32_t BIAS = 0x43004300u;  // bfloat16 128 in both halves
  static constexpr float K0 = 128.f;
  // bias: BIAS in a register (pin), so that the and-or is one LOP3 (it takes one immediate, here the mask).
  __device__ static __forceinline__ uint32_t pair(const Chunk<4>& c, int p, uint32_t bias) {  // p: a constant
    const uint32_t word = p < 4 ? c.w.x : p < 8 ? c.w.y : p < 12 ? c.w.z : c.w.w;
    const uint32_t v = __byte_perm(word, word >> 4, (p & 3) | ((4 + (p & 3)) << 8));
    return and_or<0x000F000Fu>(v, bias);
  }
};

// One (row g, row g+8) pair of group parameters, raw: converted only where used, so a load does not stall.
template <typename PT> struct GroupParams {
  PT a, b, a8, b8;
  __device__ __forceinline__ void load(const PT* row, int gi) {  // row: params of (tile, group 0, row g)
    const PT* p = row + (size_t)gi * 32;
    a = p[0]; b = p[1]; a8 = p[16]; b8 = p[17];
  }
  // From a group's (16, 2) block staged in the ring (shared address): row g's (a, b) are adjacent, so one 32-bit
  // (half) or 64-bit (float) shared load per row.
  __device__ __forceinline__ void load_staged(uint32_t group_block, int g) {
    if constexpr (sizeof(PT) == 2) {
      const uint32_t r0 = lds32(group_block + 4 * g), r8 = lds32(group_block + 4 * (g + 8));
      a = reinterpret_cast<const PT*>(&r0)[0]; b = reinterpret_cast<const PT*>(&r0)[1];
      a8 = reinterpret_cast<const PT*>(&r8)[0]; b8 = reinterpret_cast<const PT*>(&r8)[1];
    } else {
      const uint2 r0 = lds64(group_block + 8 * g), r8 = lds64(group_block + 8 * (g + 8));
      a = __uint_as_float(r0.x); b = __uint_as_float(r0.y); a8 = __uint_as_float(r8.x); b8 = __uint_as_float(r8.y);
    }
  }
};

// Explicit conversions: torch extensions build with __CUDA_NO_HALF_CONVERSIONS__ (no implicit float <-> half).
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// v (rounded to T) in both halves of a half2 / bfloat162 bit pattern.
template <typename T> __device__ __forceinline__ uint32_t splat2(float v) {
  const T h = from_f<T>(v);
  return (uint32_t)*reinterpret_cast<const uint16_t*>(&h) * 0x10001u;
}
template <typename PT> __device__ __forceinline__ float to_f(PT v) { return static_cast<float>(v); }
// The two values of a half2 / bfloat162 bit pattern, summed in float.
template <typename T> __device__ __forceinline__ float sum2(uint32_t v);
template <> __device__ __forceinline__ float sum2<__half>(uint32_t v) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
  return f.x + f.y;
}
template <> __device__ __forceinline__ float sum2<__nv_bfloat16>(uint32_t v) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  return f.x + f.y;
}
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// The pair table in shared memory: entry e of lane l at byte e*128 + 4*l (one copy per lane, so the lookups of a
// warp never share a bank). A lookup is one shift-add and one 32-bit shared load: the address is formed as a
// 32-bit shared-window offset here because the compiler, given a pointer, spends two more integer instructions.
// The 2- and 3-bit tables (16 and 64 entries: 2 and 8 KB) start at an address aligned to their size (table_align),
// so an entry's address is one and-or of the chunk bits that Chunk<BITS>::at7 shifted into place and the lane's
// base: a pair then costs a shift, a LOP3 and the load, as a 4-bit pair does (a byte select, a shift-add and the
// load). Extracting the index and adding it took two to four more instructions. (The 4-bit table is 32 KB; aligning
// it could cost as much again.)
template <int BITS> __host__ __device__ constexpr int table_align() { return BITS == 4 ? 16 : 128 << (2 * BITS); }
struct PairTable {
  uint32_t base;  // this lane's copy, as a shared-window address
  __device__ __forceinline__ PairTable(const uint32_t* smem, int lane)
      : base(shared_addr(smem) + 4 * lane) {}
  // Warp w copies entries w*32.. : one coalesced load per 32 entries, then each entry is shuffled to all lanes
  // and stored as one conflict-free row. (An element-wise loop waited on a dependent load per stored word: about
  // 32 load latencies per CTA before any weight was read.)
  __device__ static void fill(uint32_t* smem, const uint32_t* __restrict__ table, int te) {
    const int lane = threadIdx.x & 31;
    for (int e0 = (threadIdx.x >> 5) * 32; e0 < te; e0 += (blockDim.x >> 5) * 32) {
      const uint32_t v = e0 + lane < te ? table[e0 + lane] : 0u;
      const int n = min(32, te - e0);
#pragma unroll 8
      for (int j = 0; j < n; ++j) smem[(e0 + j) * 32 + lane] = __shfl_sync(0xffffffffu, v, j);
    }
  }
  template <int B> __device__ __forceinline__ uint32_t operator()(const Chunk<B>& c, int p) const {
    if constexpr (B != 4) return lds32(and_or<((1u << (2 * B)) - 1) << 7>(c.at7(p), base));  // the entry's bits
    else return lds32(base + (c.idx(p) << 7));
  }
};

// x (M, K) row stride ldx; qw: (Ntiles, KB, 16, 4, CW) int32 words; params: (Ntiles, NG, 16, 2) of PT;
// table: 4**BITS uint32 pair entries; y (M, N); ws: (S, M, Npad) fp32; counters: one int per (CTA row, M tile).
// Shared memory: the pair table; each warp's weight ring (RING slots of one block's 64 chunks: rows 0-7 by lane,
// then rows 8-15; then, where groups are whole blocks, the (16, 2) parameters of the block's group); x staged as
// srows + 1 rows (srows = the rows of x this CTA has, at most MT * 8; the extra row is zeros and stands in for the
// B-fragment rows past M, so decode does not stage 8 rows), in one stage buffer, or two used in turn at more than
// one M tile (x_buffers).
// The ring: block kb + RING - 1 is requested before block kb is decoded, so a warp keeps RING - 1 blocks of
// loads in flight (the profile of direct loads, one block ahead, showed DRAM at 12 % and warps waiting on it).
// A block's 64 chunks are contiguous in the layout and copied as 16-byte units spread over the lanes; each lane
// waits for its own copies and __syncwarp makes every lane's copies visible to the warp. The group parameters
// travel in the same slot: loaded directly, one block ahead, their latency was the largest stall of the two-scale
// formats at M = 1 (long scoreboard, Nsight Compute).
// Words of one ring slot: a block's chunks of one tile, then its group's (16, 2) parameters (used where groups are
// whole blocks). A multiple of 4 words, so every slot starts 16-byte aligned.
template <int BITS, typename PT> __host__ __device__ constexpr int ring_slot_words() {
  return 64 * chunk_words<BITS>() + 32 * (int)sizeof(PT) / 4;
}
// Words of shared memory the x stage takes: rows = min(MT * 8, M) + 1 (a CTA's rows of x, at most, and the zero
// row) of stage_blocks * 128 + 8 values. The block sums of x (zero-point mode: float [stage_blocks][MT * 8]) follow.
template <typename T> __host__ __device__ constexpr int x_stage_words(int rows, int stage_blocks) {
  return (rows * (stage_blocks * BLOCK_K + 8) * (int)sizeof(T) + 15) / 16 * 4;  // 16-byte aligned sums
}
// Stages of x in shared memory: two at more than one M tile, so that the next stage's copy runs under this one's
// MMAs (one stage made every CTA wait at each stage for its copy: at 8 tiles about 115 KB from L2 per stage, every
// 7 blocks, with the weight ring drained by the same wait). One at one M tile, where a split usually has a single
// stage and shared memory sets the CTAs per SM.
template <int MT> __host__ __device__ constexpr int x_buffers() { return MT > 1 ? 2 : 1; }

// INTD: the 4-bit identity grid with a zero point at bfloat16, decoded by IntDecode (table == nullptr, no table in
// shared memory). NT: 16-row tiles of W per warp (tiles_per_warp in quant_mma_args.h): two on SCALE_A's path at 8 M
// tiles, where each B fragment then feeds two MMAs. One warp's 16 rows x 64 rows of x took 4 ldmatrix.x4 per 8
// MMAs, with shared memory the busiest unit; two tiles take them per 16 MMAs (and a CTA's staged x serves 256 rows
// of W, half the x copies per weight).
template <typename T, typename PT, int BITS, int MODE, int MT, bool INTD, int NT>
__global__ void __launch_bounds__(WARPS * 32, MT == 1 ? (BITS == 4 && !INTD ? 3 : 4) : MT == 2 ? 2 : 1)
quant_mma_kernel(const T* __restrict__ x, int M, int K, int ldx, const uint32_t* __restrict__ qw,
                 const PT* __restrict__ params, const uint32_t* __restrict__ table, T* __restrict__ y, int N,
                 int Ntiles, int KB, int group, int NG, int blocks_per_split, int stage_blocks,
                 float* __restrict__ ws, int* __restrict__ counters) {
  static_assert(!INTD || (BITS == 4 && MODE == MODE_ZERO && std::is_same<T, __nv_bfloat16>::value),
                "IntDecode is for 4-bit zero-point weights and bfloat16 activations");
  constexpr int TE = INTD ? 0 : 1 << (2 * BITS);  // pair-table entries
  constexpr int CW = chunk_words<BITS>();
  constexpr int ROWS = MT * 8;         // rows of x per CTA
  constexpr int GW = 64 * CW;          // words of one block of one tile in global memory
  constexpr int SLOT = ring_slot_words<BITS, PT>();  // + its group's parameters
  // Zero-point weights at two or more M tiles fold the zero point into the A fragments where groups are whole
  // blocks: every register becomes (v - z, v' - z) by one HSUB2 per block-constant z, so the MMAs sum S(v - z)
  // directly and the flush is the symmetric one. Exact: pack() admits zero-point weights only with integer grid
  // values and zero points in [-128, 128], so each v - z (and IntDecode's (K0 + c) - (K0 + z)) is an integer of
  // magnitude <= 256, exact in float16 and bfloat16. The x sums S(1) it replaces took one warp reduction per (row,
  // block) of every stage between two barriers: at 8 tiles about a quarter of a block's instructions. One M tile
  // keeps the sums: there a fold costs as many HSUB2 per slice as it has MMAs, and the sums are 8 rows.
  constexpr bool FOLD = MODE == MODE_ZERO && MT > 1;
  // bfloat16 at two or more M tiles, groups of whole blocks: the A fragments are scaled before the MMAs, so every
  // format takes one MMA per tile and slice and accumulates straight into acc (no per-group sums, no flush):
  //   sym: a v;   zero point: a (v - z) (FOLD first);   two scales: v times a or b by the sign of v (a PRMT makes
  //   the halves' sign masks, a LOP3 selects the scale: no second MMA over min(v, 0)).
  // The weight is then rounded to bfloat16 once more (v a), as dequantize + cuBLAS rounds it; bfloat16 has
  // float's range, so no scale over- or underflows (float16 keeps the unscaled sums: a scale times a grid value
  // can leave its range).
  constexpr bool SCALE_A = MT > 1 && std::is_same<T, __nv_bfloat16>::value;
  static_assert(NT == 1 || (SCALE_A && MT == 8), "two tiles per warp: SCALE_A's path at 8 M tiles only");
  HFE_DYNAMIC_SMEM(smem);
  constexpr uint32_t TA = table_align<BITS>();
  uint32_t* tbl = smem + ((TA - (shared_addr(smem) & (TA - 1))) & (TA - 1)) / 4;  // launch_typed allows for this
  uint32_t* ring = tbl + TE * 32;                           // [WARPS][RING][NT][SLOT]
  T* xs = reinterpret_cast<T*>(ring + WARPS * RING * NT * SLOT);  // [x_buffers<MT>()][srows + 1][stage_k + 8]
  const int xbuf_words = x_stage_words<T>(min(ROWS, M) + 1, stage_blocks);
  float* xsum = reinterpret_cast<float*>(ring + WARPS * RING * NT * SLOT + x_buffers<MT>() * xbuf_words);
  __shared__ int last_flag;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int tile = (blockIdx.x * WARPS + warp) * NT;  // the warp's first tile; its others follow
  // NT == 2: whether the second tile exists (an odd tile count leaves the last warp one). Its ring slots are then
  // zero-filled, so it decodes to zeros with zero scales, and its outputs are not written.
  const bool live1 = NT > 1 && tile + 1 < Ntiles;
  const int split = blockIdx.y, S = gridDim.y;
  const int m0 = blockIdx.z * ROWS, srows = min(ROWS, M - m0);
  const int kb0 = split * blocks_per_split, kb1 = min(KB, kb0 + blocks_per_split);
  const int stage_k = stage_blocks * BLOCK_K, xstride = stage_k + 8;  // +8: rows land on different banks
  const bool vec_x = K % 8 == 0 && ldx % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;

  const bool live = tile < Ntiles;
  // Groups of whole blocks (group % 128 == 0, the common case): every block lies in one group, so the group
  // checks happen once per block instead of once per slice, and the group's parameters ride in the block's slot.
  const bool aligned = group % BLOCK_K == 0;
  uint32_t* myring = ring + warp * RING * NT * SLOT;
  // Requests run in block order (kb0, kb0 + 1, ...), so their sources advance by a step per request instead of
  // being recomputed from kb (64-bit address arithmetic, about 30 instructions per block); 32-bit offsets from
  // the kernel's arguments, to spare registers (the decode kernel has 80).
  uint32_t wreq = ((uint32_t)tile * KB + kb0) * GW + 4 * lane;  // words: this lane's first 16-byte unit
  const uint32_t ring_s = shared_addr(myring), rlane = ring_s + 16 * lane;
  // The parameters of the next request's group (lanes below PW16 copy one 16-byte unit each; bytes from params),
  // and how many more requests read that group.
  constexpr int PW16 = 32 * (int)sizeof(PT) / 16;
  const int bpg = aligned ? group / BLOCK_K : 1;
  uint32_t preq = ((uint32_t)tile * NG + (aligned ? kb0 / bpg : 0)) * 32 * sizeof(PT) + 16 * lane;
  int pleft = bpg - (aligned ? kb0 % bpg : 0);
  // Request block kb (if this split has it) into its slot; always one commit group per call, so that
  // wait_group<RING - 1> after requesting block kb + RING - 1 means "block kb has landed" (a stage of x,
  // below, is a group too, waited for in full).
  auto request = [&](int kb) {
    if (live && kb < kb1) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {  // tile + j: KB blocks (NG groups) further on
        const uint32_t dst = rlane + (((kb - kb0) & (RING - 1)) * NT + j) * SLOT * 4;
        const bool here = j == 0 || live1;
        const uint32_t* wsrc = here ? qw + wreq + (uint32_t)j * KB * GW : qw;
        const char* psrc = reinterpret_cast<const char*>(params) + (here ? preq + (uint32_t)j * NG * 32 * sizeof(PT) : 0);
#pragma unroll
        for (int u = 0; u + lane < GW / 4; u += 32) cp_async16(dst + 16 * u, wsrc + 4 * u, here ? 16 : 0);
        if (aligned && lane < PW16) cp_async16(dst + GW * 4, psrc, here ? 16 : 0);
      }
    }
    cp_async_commit();
    wreq += GW;
    if (--pleft == 0) {
      preq += 32 * sizeof(PT);
      pleft = bpg;
    }
  };
  // Block kb's chunks (and, aligned, its group's parameters) of each tile from the ring.
  auto take = [&](int kb, Chunk<BITS> (&w0)[NT], Chunk<BITS> (&w8)[NT], GroupParams<PT>* p) {
    __syncwarp();  // every lane has read block kb - 1, whose slot the next request overwrites
    request(kb + RING - 1);
    cp_async_wait<RING - 1>();
    __syncwarp();  // block kb has landed for every lane's copies
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint32_t slot = ring_s + (((kb - kb0) & (RING - 1)) * NT + j) * SLOT * 4;
      const uint32_t src = slot + lane * CW * 4;  // chunk (row g, quad q) = lane
      w0[j].load(src);
      w8[j].load(src + 32 * CW * 4);
      if (p) p[j].load_staged(slot + GW * 4, g);
    }
  };
  for (int j = 0; j < RING - 1; ++j) request(kb0 + j);  // the weight stream starts before the table fill

  if constexpr (!INTD) PairTable::fill(tbl, table, TE);
  const PairTable lookup(tbl, lane);

  float acc[NT][MT][4], cg[MT][4], c2[MT][4];  // cg, c2: NT == 1 only
#pragma unroll
  for (int t = 0; t < MT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      cg[t][i] = c2[t][i] = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j][t][i] = 0.f;
    }

  const PT* prow = params + (size_t)tile * NG * 32 + g * 2;
  uint32_t ones = 0;
  if constexpr (MODE == MODE_ZERO) {
    T one2[2] = {from_f<T>(1.0f), from_f<T>(1.0f)};
    ones = *reinterpret_cast<uint32_t*>(one2);
  }
  const uint32_t xs_s = shared_addr(xs);
  const uint32_t int_bias = INTD ? pin(IntDecode::BIAS) : 0u;
  // B fragments come from the staged x by ldmatrix: one x4 is four 8-row x 8-K matrices, i.e. the (b0, b1) of two
  // MMAs: slices s and s + 1 of the one M tile at MT == 1, tiles t and t + 1 of slice s otherwise (16 B loads per
  // block and tile were 32-bit loads before). lrow: the byte offset of the row this lane addresses (the zero row
  // past the CTA's rows), per pair of M tiles.
  constexpr int TP = MT == 1 ? 1 : MT / 2;
  uint32_t lrow[TP];
#pragma unroll
  for (int tp = 0; tp < TP; ++tp) {
    const int r = MT == 1 ? (lane & 7) : (2 * tp + (lane >> 4)) * 8 + (lane & 7);
    const int kofs = MT == 1 ? 8 * (lane >> 3) : 8 * ((lane >> 3) & 1);
    lrow[tp] = (min(r, srows) * xstride + kofs) * (int)sizeof(T);
  }
  uint32_t bs[4];  // MT == 1: slices s and s + 1, loaded at even s
  // Per tile: FOLD's zero points (+ IntDecode's K0) of rows g and g + 8, splat (else 0); SCALE_A's a (and b).
  uint32_t zf0[NT] = {}, zf8[NT] = {}, sa0[NT] = {}, sa8[NT] = {}, sb0[NT] = {}, sb8[NT] = {};

  // The MMAs of slice s (16 K) of a block: A rows g / g+8 (chunks w0 / w8) at K 2q..2q+1 (pair 2s) and
  // 2q+8..2q+9 (pair 2s+1); B from the staged x at xb (the shared address of the block's first column).
  // ones_mma: zero-point mode's S(1) by an MMA with all-ones A (where no x sums are staged, see below).
  // scaled: SCALE_A's path (A scaled by sa / sb, MMAs into acc).
  auto mma_slice = [&](auto ones_mma, auto scaled, const Chunk<BITS> (&w0)[NT], const Chunk<BITS> (&w8)[NT],
                       uint32_t xb, int s) {
    uint32_t a[NT][4];  // tile j's A fragment: rows g / g + 8 at pair 2s, then at pair 2s + 1
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if constexpr (INTD) {
        a[j][0] = IntDecode::pair(w0[j], 2 * s, int_bias); a[j][1] = IntDecode::pair(w8[j], 2 * s, int_bias);
        a[j][2] = IntDecode::pair(w0[j], 2 * s + 1, int_bias); a[j][3] = IntDecode::pair(w8[j], 2 * s + 1, int_bias);
      } else {
        a[j][0] = lookup(w0[j], 2 * s); a[j][1] = lookup(w8[j], 2 * s);
        a[j][2] = lookup(w0[j], 2 * s + 1); a[j][3] = lookup(w8[j], 2 * s + 1);
      }
      if constexpr (FOLD) {  // zf0 / zf8 are 0 on the path of split groups, which sums S(1) by ones_mma instead
        a[j][0] = hsub2<T>(a[j][0], zf0[j]); a[j][2] = hsub2<T>(a[j][2], zf0[j]);
        a[j][1] = hsub2<T>(a[j][1], zf8[j]); a[j][3] = hsub2<T>(a[j][3], zf8[j]);
      }
      if constexpr (decltype(scaled)::value) {
        auto scale = [](uint32_t v, uint32_t sa, uint32_t sb) {
          if constexpr (MODE == MODE_TWO) {
            const uint32_t neg = sign_mask2(v);
            return hmul2<T>(v, (neg & sb) | (~neg & sa));
          } else {
            return hmul2<T>(v, sa);
          }
        };
        a[j][0] = scale(a[j][0], sa0[j], sb0[j]); a[j][2] = scale(a[j][2], sa0[j], sb0[j]);
        a[j][1] = scale(a[j][1], sa8[j], sb8[j]); a[j][3] = scale(a[j][3], sa8[j], sb8[j]);
      }
    }
    auto mma_tile = [&](int t, uint32_t b0, uint32_t b1) {
      if constexpr (decltype(scaled)::value) {
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<T>(acc[j][t], a[j][0], a[j][1], a[j][2], a[j][3], b0, b1);
        return;
      }
      const uint32_t a0 = a[0][0], a1 = a[0][1], a2 = a[0][2], a3 = a[0][3];
      mma16816<T>(cg[t], a0, a1, a2, a3, b0, b1);
      if constexpr (MODE == MODE_TWO) mma16816<T>(c2[t], hmin0<T>(a0), hmin0<T>(a1), hmin0<T>(a2), hmin0<T>(a3), b0, b1);
      if constexpr (MODE == MODE_ZERO && decltype(ones_mma)::value)
        mma16816<T>(c2[t], ones, ones, ones, ones, b0, b1);
    };
    const uint32_t xk = xb + 16 * s * (int)sizeof(T);
    if constexpr (MT == 1) {
      if ((s & 1) == 0) ldsm_x4(bs, xk + lrow[0]);
      mma_tile(0, bs[2 * (s & 1)], bs[2 * (s & 1) + 1]);
    } else {
      // Every B fragment of the slice first, then the MMAs, with no branch between them: the compiler then issues
      // the next slice's loads under this slice's MMAs. (A `break` at the first tile pair past the CTA's rows made
      // each ldmatrix wait for its result before its MMA, on the 8-tile kernel 32 exposed shared-load latencies per
      // block.) Tiles past the rows read the zero row and their MMAs are predicated off (a warp-uniform predicate:
      // M = 17..63 on the 8-tile kernel); tile 0 always has rows.
      uint32_t b[TP][4];
#pragma unroll
      for (int tp = 0; tp < TP; ++tp) ldsm_x4(b[tp], xk + lrow[tp]);
#pragma unroll
      for (int tp = 0; tp < TP; ++tp) {
        if (tp == 0 || 2 * tp * 8 < srows) mma_tile(2 * tp, b[tp][0], b[tp][1]);
        if ((2 * tp + 1) * 8 < srows) mma_tile(2 * tp + 1, b[tp][2], b[tp][3]);
      }
    }
  };
  // A group (or this split's share of it) ends: scale its sums into acc. folded: the zero point is in cg (FOLD's
  // path of whole-block groups; c2 is not used there), so the flush is the symmetric one.
  auto flush = [&](const GroupParams<PT>& p, auto folded) {
    constexpr float bias = INTD ? IntDecode::K0 : 0.f;  // IntDecode's offset leaves with the zero point
    const float ag = to_f(p.a), bg = to_f(p.b) + bias, ag8 = to_f(p.a8), bg8 = to_f(p.b8) + bias;
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = i < 2 ? ag : ag8, b = i < 2 ? bg : bg8;
        if constexpr (MODE == MODE_SYM || decltype(folded)::value) {
          acc[0][t][i] += a * cg[t][i];
        } else if constexpr (MODE == MODE_ZERO) {
          acc[0][t][i] += a * (cg[t][i] - b * c2[t][i]);
          c2[t][i] = 0.f;
        } else {
          acc[0][t][i] += a * cg[t][i] + (b - a) * c2[t][i];  // a v+ + b v- = a v + (b - a) v-
          c2[t][i] = 0.f;
        }
        cg[t][i] = 0.f;
      }
    }
  };

  if constexpr (MODE == MODE_ZERO && !FOLD) {
    // The x sums are computed for the CTA's rows only; the sums of the rows past them feed output columns that are
    // never written, and are zeroed once so that nothing reads uninitialised memory.
    if (aligned && srows < ROWS)
      for (int i = threadIdx.x; i < stage_blocks * ROWS; i += blockDim.x) xsum[i] = 0.f;
  }
  int gi = kb0 * BLOCK_K / group;      // the group being accumulated
  int next_end = (gi + 1) * group;     // the K position where it ends
  int stage = 0, prev_blocks = 0;      // the stage (its x buffer: stage % x_buffers) and the last stage's blocks
  for (int ks = kb0; ks < kb1; ks += stage_blocks, ++stage) {
    const int kend = min(kb1, ks + stage_blocks);
    const int buf = stage % x_buffers<MT>();
    // Stage x[m0 : m0+srows, k0*128 : k1*128] (zero outside K), plus the zero row, into x buffer b: as 16-byte
    // cp.async copies, one commit group, where rows are 16-byte aligned (the common case; the caller waits), else as
    // 32-bit pairs through registers.
    auto stage_x = [&](int k0, int k1, int b) {
      if (vec_x) {
        const uint32_t dst = xs_s + b * xbuf_words * 4;
        const int units = (k1 - k0) * BLOCK_K / 8;
        for (int i = threadIdx.x; i < (srows + 1) * units; i += blockDim.x) {
          const int r = i / units, c = 8 * (i - r * units), k = k0 * BLOCK_K + c;
          const bool in = r < srows && k < K;  // K % 8 == 0: a unit is all in or all out
          cp_async16(dst + 2 * (r * xstride + c), in ? x + (size_t)(m0 + r) * ldx + k : x, in ? 16 : 0);
        }
        cp_async_commit();
      } else {
        T* dst = xs + b * xbuf_words * 4 / (int)sizeof(T);
        const int pairs = (k1 - k0) * BLOCK_K / 2;
        for (int i = threadIdx.x; i < (srows + 1) * pairs; i += blockDim.x) {
          const int r = i / pairs, c = 2 * (i - r * pairs), m = m0 + r, k = k0 * BLOCK_K + c;
          uint32_t v = 0;
          if (r < srows) {
            if (k + 1 < K && (ldx & 1) == 0) {
              v = *reinterpret_cast<const uint32_t*>(x + (size_t)m * ldx + k);
            } else if (k < K) {  // odd row stride (or the last column): two scalar loads
              T two[2] = {x[(size_t)m * ldx + k], k + 1 < K ? x[(size_t)m * ldx + k + 1] : from_f<T>(0.0f)};
              v = *reinterpret_cast<uint32_t*>(two);
            }
          }
          *reinterpret_cast<uint32_t*>(dst + r * xstride + c) = v;
        }
      }
    };
    if constexpr (x_buffers<MT>() == 1) {
      __syncthreads();  // the previous stage's x is consumed
      stage_x(ks, kend, 0);
      if (vec_x) cp_async_wait<0>();
      __syncthreads();
    } else {
      if (stage == 0) stage_x(ks, kend, 0);
      // This stage's copy was committed a stage ago (stage 0: just now), before the last stage's ring
      // requests, one per block taken: with at least RING - 1 of them, waiting for all but RING - 1 groups waits
      // for it without draining the ring.
      if (live && stage > 0 && prev_blocks >= RING - 1) cp_async_wait<RING - 1>();
      else cp_async_wait<0>();
      __syncthreads();  // this stage's x is visible to all; the other buffer's (the last stage's) is consumed
      if (kend < kb1) stage_x(kend, min(kb1, kend + stage_blocks), buf ^ 1);
      prev_blocks = kend - ks;
    }
    const uint32_t xs_b = xs_s + buf * xbuf_words * 4;  // this stage's x
    if constexpr (MODE == MODE_ZERO && !FOLD) {
      // S(1) is the sum of x over the group's K, the same for every weight row: with whole-block groups it is
      // summed here once per CTA (one warp per (block, row) of this stage; the CTA's rows only), not by an extra MMA per slice in
      // every warp (which, with the 4 registers of ones it rebuilds, cost ~5 of the ~22 instructions a slice).
      if (aligned) {
        for (int r = 0; r < srows; ++r) {
          for (int bl = warp; bl < kend - ks; bl += WARPS) {
            const uint2 v = lds64(xs_b + (r * xstride + bl * BLOCK_K + 4 * lane) * (int)sizeof(T));
            float sum = sum2<T>(v.x) + sum2<T>(v.y);
#pragma unroll
            for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) xsum[bl * ROWS + r] = sum;
          }
        }
        __syncthreads();
      }
    }
    if (!live) continue;

    if (aligned) {
      for (int kb = ks; kb < kend; ++kb) {
        Chunk<BITS> w0[NT], w8[NT];
        GroupParams<PT> p[NT];
        take(kb, w0, w8, p);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if constexpr (FOLD) {
            constexpr float k0 = INTD ? IntDecode::K0 : 0.f;
            zf0[j] = splat2<T>(to_f(p[j].b) + k0);
            zf8[j] = splat2<T>(to_f(p[j].b8) + k0);
          }
          if constexpr (SCALE_A) {
            sa0[j] = splat2<T>(to_f(p[j].a));
            sa8[j] = splat2<T>(to_f(p[j].a8));
            if constexpr (MODE == MODE_TWO) {
              sb0[j] = splat2<T>(to_f(p[j].b));
              sb8[j] = splat2<T>(to_f(p[j].b8));
            }
          }
        }
        const bool ends = (kb + 1) * BLOCK_K == next_end;
        const uint32_t xb = xs_b + (kb - ks) * BLOCK_K * (int)sizeof(T);
#pragma unroll
        for (int s = 0; s < 8; ++s)
          mma_slice(std::false_type{}, std::integral_constant<bool, SCALE_A>{}, w0, w8, xb, s);
        if constexpr (MODE == MODE_ZERO && !FOLD) {
#pragma unroll
          for (int t = 0; t < MT; ++t) {
            const float2 sm = *reinterpret_cast<const float2*>(xsum + (kb - ks) * ROWS + t * 8 + 2 * q);
            c2[t][0] += sm.x; c2[t][1] += sm.y; c2[t][2] += sm.x; c2[t][3] += sm.y;
          }
        }
        if (!SCALE_A && (ends || kb + 1 == kb1)) flush(p[0], std::integral_constant<bool, FOLD>{});
        if (ends) {
          ++gi;
          next_end += group;
        }
      }
      continue;
    }
    // Groups narrower than a block (or not aligned to blocks): check after every slice; the parameters are
    // loaded when a group ends (not prefetched: that would hold two more parameter sets in registers). One tile per
    // warp (launch_mt takes two only with whole-block groups).
    if constexpr (NT == 1) {
      for (int kb = ks; kb < kend; ++kb) {
        Chunk<BITS> w0[1], w8[1];
        take(kb, w0, w8, nullptr);
        const uint32_t xb = xs_b + (kb - ks) * BLOCK_K * (int)sizeof(T);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          mma_slice(std::true_type{}, std::false_type{}, w0, w8, xb, s);
          const int kpos = kb * BLOCK_K + 16 * (s + 1);
          if (kpos == next_end || (s == 7 && kb + 1 == kb1)) {
            GroupParams<PT> p;
            p.load(prow, gi);
            flush(p, std::false_type{});
            if (kpos == next_end) {
              ++gi;
              next_end += group;
            }
          }
        }
      }
    }
  }

  // Output: rows n = (tile + j)*16 + g (+8), columns m = m0 + t*8 + 2q (+1); with split-K, this split's fp32
  // partial.
  const int Npad = Ntiles * 16;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (!live || (j > 0 && !live1)) continue;
    const int n0 = (tile + j) * 16 + g;
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + t * 8 + 2 * q + (i & 1), n = n0 + (i >> 1) * 8;
        if (m >= M) continue;
        if (S == 1) {
          if (n < N) y[(size_t)m * N + n] = from_f<T>(acc[j][t][i]);
        } else {
          ws[((size_t)split * M + m) * Npad + n] = acc[j][t][i];
        }
      }
  }
  if (S == 1) return;
  __threadfence();
  __syncthreads();
  int* counter = counters + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) {
    const int arrived = atomicAdd(counter, 1);
    last_flag = arrived == S - 1;
    if (last_flag) *counter = 0;  // ready for the next call
  }
  __syncthreads();
  if (!last_flag) return;
  __threadfence();
  // The last split sums all partials of this CTA's rows (coalesced along n), four columns per load and up to eight
  // splits' loads in flight: one CTA reads S * rows * CTA_N floats here (at 8 M tiles and two tiles per warp, 64 KB
  // per split), and one float per load with the splits summed in turn made that a chain of L2 round trips. A unit
  // of four never straddles a row or N's end in the workspace (Npad and n are multiples of 4, n < N <= Npad); y's
  // columns past N are skipped one by one.
  constexpr int CTA_N = WARPS * NT * 16;  // rows of W per CTA
  constexpr int UNITS = CTA_N / 4;
  const int rows_here = min(ROWS, M - m0), nb = blockIdx.x * CTA_N;
  const size_t split_stride = (size_t)M * Npad / 4;  // float4 units between two splits' partials
  for (int i = threadIdx.x; i < rows_here * UNITS; i += blockDim.x) {
    const int m = m0 + i / UNITS, n = nb + 4 * (i % UNITS);
    if (n >= N) continue;
    const float4* src = reinterpret_cast<const float4*>(ws + (size_t)m * Npad + n);
    float4 s = __ldcg(src);
#pragma unroll 8
    for (int sp = 1; sp < S; ++sp) {
      const float4 v = __ldcg(src + sp * split_stride);
      s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
    }
    T* out = y + (size_t)m * N + n;
    out[0] = from_f<T>(s.x);
    if (n + 1 < N) out[1] = from_f<T>(s.y);
    if (n + 2 < N) out[2] = from_f<T>(s.z);
    if (n + 3 < N) out[3] = from_f<T>(s.w);
  }
}

}  // namespace hfe_mma

// ---------------------------------------------------------------------------------------------------------------
// Host side: one explicit instantiation of launch<BITS, MODE> per generated translation unit (kernels/quant_mma.py
// writes them), so the 9 (bits, mode) pairs compile in parallel.
namespace hfe_mma {


// The current device's opt-in dynamic shared memory per CTA (a cheap query; asked at each launch, so that the
// emulation's limit can change between calls).
inline int smem_optin() {
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return v;
}

template <typename T, typename PT, int BITS, int MODE, int MT, bool INTD, int NT>
void launch_typed(const Args& a) {
  constexpr int TE = INTD ? 0 : 1 << (2 * BITS);
  const int row_ctas = (a.Ntiles + WARPS * NT - 1) / (WARPS * NT);
  // x stages: the CTA's rows of x plus the zero row, never more K than one split covers, in all up to
  //   8 KB at one M tile, one stage (decode: with the 4-bit table and ring, 76 KB per CTA, 3 CTAs per SM;
  //      IntDecode's 44 KB, 4 CTAs; 4 KB where float parameters make the ring 2 KB larger),
  //   36 KB at two, two stages of 18 KB (2 CTAs per SM),
  //   128 KB at eight, two stages of 64 KB (1 CTA per SM, by registers; 3 blocks of 64 rows a stage).
  const int rows = std::min(MT * 8, a.M) + 1;
  // the table's alignment may skip up to table_align - 16 bytes (the dynamic shared memory is 16-byte aligned)
  const size_t fixed = TE * 128 + (TE ? table_align<BITS>() - 16 : 0) +
                       (size_t)WARPS * RING * NT * ring_slot_words<BITS, PT>() * 4;
  // The x stages also fit what the device allows a CTA beside the table and the ring (an A100's 163 KB does not
  // hold the 8-tile budget; an H100's or H200's 227 KB does): bytes per buffer, less each row's 8 extra values and
  // the 16-byte rounding of x_stage_words.
  const int per_buffer = (int)std::min<size_t>(
      (size_t)(MT == 1 ? (sizeof(PT) == 4 ? 4096 : 8192) : MT == 2 ? 36864 : 131072) / x_buffers<MT>(),
      ((size_t)smem_optin() - fixed) / x_buffers<MT>() - rows * 8 * sizeof(T) - 16);
  const int stage_blocks = std::max(1, std::min(per_buffer / (rows * BLOCK_K * (int)sizeof(T)), a.blocks_per_split));
  const size_t sums = MODE == MODE_ZERO && MT == 1 ? (size_t)stage_blocks * MT * 8 : 0;  // FOLD needs none
  const size_t smem = fixed + 4 * ((size_t)x_buffers<MT>() * x_stage_words<T>(rows, stage_blocks) + sums);
  if (smem > (size_t)smem_optin())  // not even one block of x fits: say so, not "invalid argument" at the launch
    throw std::runtime_error("quant_mma: " + std::to_string(smem) + " bytes of shared memory per CTA at M = " +
                             std::to_string(a.M) + ", more than this GPU allows (" + std::to_string(smem_optin()) +
                             "); use the Triton kernels (force_kernel(\"gemv\"))");
  auto kern = quant_mma_kernel<T, PT, BITS, MODE, MT, INTD, NT>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  dim3 grid(row_ctas, a.splits, (a.M + MT * 8 - 1) / (MT * 8));
  HFE_LAUNCH(kern, grid, WARPS * 32, smem, a.stream,
      static_cast<const T*>(a.x), a.M, a.K, a.ldx, a.qw, static_cast<const PT*>(a.params), a.table,
      static_cast<T*>(a.y), a.N, a.Ntiles, a.KB, a.group, a.NG, a.blocks_per_split, stage_blocks, a.ws, a.counters);
}

template <typename T, typename PT, int BITS, int MODE, bool INTD>
void launch_mt(const Args& a) {
  switch (mtiles_for(a.M)) {
    case 1: return launch_typed<T, PT, BITS, MODE, 1, INTD, 1>(a);
    case 2: return launch_typed<T, PT, BITS, MODE, 2, INTD, 1>(a);
    default:
      if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        if (tiles_per_warp(a.M, true, a.group) == 2) return launch_typed<T, PT, BITS, MODE, 8, INTD, 2>(a);
      }
      return launch_typed<T, PT, BITS, MODE, 8, INTD, 1>(a);
  }
}

template <int BITS, int MODE>
void launch(const Args& a) {
  if constexpr (BITS == 4 && MODE == MODE_ZERO) {
    if (a.table == nullptr) {  // IntDecode (the binding checked: bfloat16 activations)
      if (a.params_f32) launch_mt<__nv_bfloat16, float, BITS, MODE, true>(a);
      else launch_mt<__nv_bfloat16, __half, BITS, MODE, true>(a);
      return;
    }
  }
  if (a.bf16) {
    if (a.params_f32) launch_mt<__nv_bfloat16, float, BITS, MODE, false>(a);
    else launch_mt<__nv_bfloat16, __half, BITS, MODE, false>(a);
  } else {
    if (a.params_f32) launch_mt<__half, float, BITS, MODE, false>(a);
    else launch_mt<__half, __half, BITS, MODE, false>(a);
  }
}

}  // namespace hfe_mma
