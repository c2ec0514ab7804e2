// The CUDA the mma kernel (quant_mma.cuh) is written with, emulated on the CPU, so that the kernel's own code runs
// in the CPU tests: hf_efficient.kernels.quant_mma.emulation() builds it with -DHFE_MMA_EMULATE. It defines the
// primitives of quant_mma_ptx.cuh and the parts of CUDA the kernel uses (thread indices, barriers, warp shuffles,
// half/bfloat16 conversions, __byte_perm, atomics). It checks what the code computes, not how fast:
// * every thread of a CTA is a fiber (ucontext) on one OS thread; CTAs run one at a time, in a shuffled order;
// * __syncthreads, __syncwarp and the warp collectives (mma.sync, ldmatrix, __shfl_sync) are barriers. One that can never
//   complete (a divergent __syncthreads, a collective some lanes skip, lanes in different collectives) is reported
//   as an error, where a GPU would hang or compute garbage;
// * a cp.async copy lands only when its thread waits for its group (a read before the wait sees the old bytes);
//   its source must lie inside a tensor the binding registered and be 16-byte aligned, like its destination;
// * dynamic shared memory starts as 0xFF bytes (NaN in float16/bfloat16/float32): a value read but never written
//   shows up in the output. Shared loads are bounds- and alignment-checked; so is the launch's shared memory size;
// * mma.sync forms its 16 products exactly and sums them in float32 in K order onto the accumulator (the tensor
//   cores' order and rounding are unspecified, so the tests compare against a bound, as on the GPU).
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // CTAs run one at a time, so a function's static is its CTA's shared variable
#define HFE_DYNAMIC_SMEM(name) uint32_t* const name = ::hfe_emu::dynamic_smem()
#define HFE_LAUNCH(kern, grid, block, smem, stream, ...) \
  ::hfe_emu::launch(grid, block, smem, [&] { kern(__VA_ARGS__); })

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
typedef struct CUstream_st* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F> inline int cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
// The emulated device's opt-in dynamic shared memory per CTA: an sm_90 CTA's 227 KB, or HFE_EMU_SMEM_OPTIN bytes
// (tests set 163 KB, an A100's). Launches above it fail.
inline int hfe_emu_smem_optin() {
  const char* v = getenv("HFE_EMU_SMEM_OPTIN");
  return v && *v ? atoi(v) : 232448;
}
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
inline int cudaGetDevice(int* device) { *device = 0; return 0; }
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) { *value = hfe_emu_smem_optin(); return 0; }
using std::max;
using std::min;

// ------------------------------------------------------------------------------------------------ 16-bit floats
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
// min of each half; a NaN loses to a number, as in CUDA
template <typename H, float (*F)(H)> inline H hmin_(H a, H b) {
  const float x = F(a), y = F(b);
  return x != x ? b : y != y ? a : y < x ? b : a;
}
inline __half2 __hmin2(__half2 a, __half2 b) {
  return {hmin_<__half, __half2float>(a.x, b.x), hmin_<__half, __half2float>(a.y, b.y)};
}
inline __nv_bfloat162 __hmin2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {hmin_<__nv_bfloat16, __bfloat162float>(a.x, b.x), hmin_<__nv_bfloat16, __bfloat162float>(a.y, b.y)};
}
// a - b of each half, computed in double (exact for two float16 values) and rounded once to float16; bfloat16
// through float (the kernel subtracts integers, exact either way)
inline __half2 __hsub2(__half2 a, __half2 b) {
  auto sub = [](__half x, __half y) {
    const _Float16 f = static_cast<_Float16>(static_cast<double>(__half2float(x)) - __half2float(y));
    __half h;
    memcpy(&h.x, &f, 2);
    return h;
  };
  return {sub(a.x, b.x), sub(a.y, b.y)};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) - __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) - __bfloat162float(b.y))};
}
// a * b of each half: the product of two bfloat16 values is exact in float, so one rounding, as on the GPU
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return {__float2bfloat16_rn(__bfloat162float(a.x) * __bfloat162float(b.x)),
          __float2bfloat16_rn(__bfloat162float(a.y) * __bfloat162float(b.y))};
}
inline float __uint_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
// the low 32 bits of the 64-bit {hi, lo} shifted right by s & 31
inline uint32_t __funnelshift_r(uint32_t lo, uint32_t hi, uint32_t s) {
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (s & 31));
}
// byte i of the result = byte (s >> 4i) & 7 of the 8 bytes {x, y} (x: bytes 0-3)
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t v = static_cast<uint64_t>(y) << 32 | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

// ------------------------------------------------------------------------------------------------ the runtime
namespace hfe_emu {

// The shared window starts with bytes that stand for the kernel's static __shared__ variables, as on a GPU, so the
// dynamic shared memory does not start at address 0 (code that assumes an alignment of it has to establish it).
constexpr size_t STATIC_SMEM = 16;
constexpr size_t STACK = 1 << 17;
constexpr int XW = 8;                         // words a lane posts to a warp collective (the last: its kind)
enum Kind : uint32_t { MMA_F16 = 1, MMA_BF16, SHFL, SHFL_XOR, LDSM };

struct Copy {
  uint32_t dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  int waiting = 0;  // 0 runnable, 1 at a warp barrier, 2 at __syncthreads
  unsigned wait_gen = 0, xphase = 0;
  std::vector<Copy> open;                  // cp.async copies since the last commit
  std::vector<std::vector<Copy>> groups;  // committed groups, oldest first
};

struct Runtime {
  dim3 grid, block, bidx;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  int cur = -1, live = 0, cta_arrived = 0;
  unsigned cta_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_gen;
  std::vector<uint32_t> xch;  // [warp][phase][lane][XW]
  const std::function<void()>* body = nullptr;
  std::string error;
  std::vector<std::pair<const char*, size_t>> regions;  // global memory cp.async may read
  unsigned launches = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}
inline Fiber& me() { return rt().fibers[rt().cur]; }

[[noreturn]] inline void fail(const std::string& what) {
  const Fiber& f = me();
  const dim3 b = rt().bidx;
  throw std::runtime_error("hfe_emu: " + what + " (block " + std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                           std::to_string(b.z) + ", thread " + std::to_string(f.tid.x) + ")");
}

inline void yield() { swapcontext(&me().ctx, &rt().sched); }

// Arrive at a barrier of `expected` threads: the last to arrive moves its generation on, which releases the others
// (`waiting`: what blocked() checks for this thread, 1 a warp barrier, 2 __syncthreads).
inline void arrive(int& arrived, unsigned& gen, int expected, int waiting) {
  Fiber& f = me();
  const unsigned g = gen;
  if (++arrived == expected) {
    arrived = 0;
    ++gen;
    return;
  }
  f.waiting = waiting;
  f.wait_gen = g;
  while (gen == g) yield();
  f.waiting = 0;
}
inline void warp_barrier() {
  Runtime& r = rt();
  const int w = me().warp;
  arrive(r.warp_arrived[w], r.warp_gen[w], 32, 1);
}
inline void cta_barrier() {
  Runtime& r = rt();
  arrive(r.cta_arrived, r.cta_gen, r.live, 2);  // threads that have exited do not count
}

// Post this lane's words, wait for the warp, return the warp's [32][XW] posts (double-buffered: a lane that runs
// ahead writes the other phase, which no lane can still be reading).
template <int W> inline const uint32_t* exchange(Kind kind, const uint32_t (&mine)[W]) {
  static_assert(W < XW, "too many words for one collective");
  Runtime& r = rt();
  Fiber& f = me();
  uint32_t* base = &r.xch[((size_t)f.warp * 2 + f.xphase) * 32 * XW];
  f.xphase ^= 1;
  std::copy(mine, mine + W, base + f.lane * XW);
  base[f.lane * XW + XW - 1] = kind;
  warp_barrier();
  for (int l = 0; l < 32; ++l)
    if (base[l * XW + XW - 1] != kind) fail("lanes of one warp are in different warp collectives");
  return base;
}

inline size_t smem_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  Runtime& r = rt();
  if (c < r.smem.data() + STATIC_SMEM || c > r.smem.data() + r.smem.size())
    fail("a shared address of memory that is not dynamic shared memory");
  return static_cast<size_t>(c - r.smem.data());
}
inline unsigned char* smem_at(uint32_t a, size_t bytes) {
  Runtime& r = rt();
  if (a % bytes && bytes <= 16) fail("misaligned shared access of " + std::to_string(bytes) + " bytes at " +
                                     std::to_string(a));
  if (a < STATIC_SMEM || a + bytes > r.smem.size())
    fail("shared access at " + std::to_string(a) + " outside the " + std::to_string(r.smem.size() - STATIC_SMEM) +
         " bytes of dynamic shared memory (at " + std::to_string(STATIC_SMEM) + ")");
  return r.smem.data() + a;
}
inline uint32_t* dynamic_smem() { return reinterpret_cast<uint32_t*>(rt().smem.data() + STATIC_SMEM); }

inline void check_region(const void* src, int bytes) {
  const char* s = static_cast<const char*>(src);
  for (const auto& reg : rt().regions)
    if (s >= reg.first && s + bytes <= reg.first + reg.second) return;
  fail("cp.async reads outside every input tensor");
}

inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    unsigned char* d = smem_at(c.dst, 16);
    memset(d, 0, 16);
    if (c.bytes) memcpy(d, c.src, c.bytes);
  }
}

inline void fiber_entry() {
  Runtime& r = rt();
  try {
    (*r.body)();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  }
  Fiber& f = me();
  f.done = true;
  if (--r.live > 0 && r.cta_arrived > 0 && r.cta_arrived == r.live) {  // the others wait only for this thread
    r.cta_arrived = 0;
    ++r.cta_gen;
  }
}  // returns to the scheduler (uc_link)

inline bool blocked(const Fiber& f) {
  const Runtime& r = rt();
  return f.waiting == 1 ? r.warp_gen[f.warp] == f.wait_gen : f.waiting == 2 && r.cta_gen == f.wait_gen;
}

// Runs body() as every thread of every CTA of the grid; throws std::runtime_error on the first error.
template <typename F> void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& fn) {
  Runtime& r = rt();
  const std::function<void()> body(fn);
  const int n = block.x * block.y * block.z, warps = n / 32;
  if (block.y != 1 || block.z != 1 || n % 32) throw std::runtime_error("hfe_emu: only 1-D blocks of whole warps");
  if (smem_bytes > (size_t)hfe_emu_smem_optin())
    throw std::runtime_error("hfe_emu: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than "
                             "the emulated device's " + std::to_string(hfe_emu_smem_optin()) + " per CTA");
  r.body = &body;
  r.grid = grid;
  r.block = block;
  r.error.clear();
  while ((int)r.stacks.size() < n) r.stacks.emplace_back(new char[STACK]);
  r.fibers.resize(n);  // each CTA starts them afresh
  r.warp_arrived.assign(warps, 0);
  r.warp_gen.assign(warps, 0);
  r.xch.assign((size_t)warps * 2 * 32 * XW, 0);
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  std::mt19937 rng(++r.launches);
  std::shuffle(order.begin(), order.end(), rng);
  for (const dim3& b : order) {
    r.bidx = b;
    r.smem.assign(STATIC_SMEM + smem_bytes, 0xff);
    r.live = n;
    r.cta_arrived = 0;
    std::fill(r.warp_arrived.begin(), r.warp_arrived.end(), 0);
    for (int i = 0; i < n; ++i) {
      Fiber& f = r.fibers[i];
      f = Fiber();
      f.tid = dim3(i);
      f.warp = i / 32;
      f.lane = i % 32;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = r.stacks[i].get();
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = &r.sched;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    while (r.live > 0) {
      bool ran = false;
      for (int i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        if (f.done || blocked(f)) continue;
        r.cur = i;
        swapcontext(&r.sched, &f.ctx);
        ran = true;
        if (!r.error.empty()) throw std::runtime_error(r.error);
      }
      if (!ran) {
        int at_warp = 0, at_cta = 0;
        for (const Fiber& f : r.fibers) {
          at_warp += !f.done && f.waiting == 1;
          at_cta += !f.done && f.waiting == 2;
        }
        throw std::runtime_error("hfe_emu: deadlock in block " + std::to_string(b.x) + "," + std::to_string(b.y) +
                                 "," + std::to_string(b.z) + ": " + std::to_string(at_warp) +
                                 " threads wait at a warp barrier or collective, " + std::to_string(at_cta) +
                                 " at __syncthreads, " + std::to_string(n - r.live) + " have exited");
      }
    }
  }
  r.cur = -1;
}

// The global memory of one launch that cp.async may read (the binding registers its tensors).
struct Regions {
  explicit Regions(std::vector<std::pair<const void*, size_t>> regs) {
    rt().regions.clear();
    for (const auto& p : regs) rt().regions.emplace_back(static_cast<const char*>(p.first), p.second);
  }
  ~Regions() { rt().regions.clear(); }
};

inline const dim3& thread_idx() { return me().tid; }

}  // namespace hfe_emu

#define threadIdx (::hfe_emu::thread_idx())
#define blockIdx (::hfe_emu::rt().bidx)
#define blockDim (::hfe_emu::rt().block)
#define gridDim (::hfe_emu::rt().grid)

inline void __syncthreads() { ::hfe_emu::cta_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::hfe_emu::fail("__syncwarp with a partial mask");
  ::hfe_emu::warp_barrier();
}
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) {  // one thread runs at a time
  const int old = *p;
  *p = v + old;
  return old;
}
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ::hfe_emu::fail("a 16-byte global load that is not 16-byte aligned");
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::hfe_emu::smem_offset(p); }

template <typename V> inline V shfl_(::hfe_emu::Kind kind, unsigned mask, V v, int lane_of_src) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) ::hfe_emu::fail("a warp shuffle with a partial mask");
  uint32_t mine[1];
  memcpy(mine, &v, 4);
  const uint32_t* all = ::hfe_emu::exchange(kind, mine);
  V out;
  memcpy(&out, all + (lane_of_src & 31) * ::hfe_emu::XW, 4);
  return out;
}
template <typename V> inline V __shfl_sync(unsigned mask, V v, int src) {
  return shfl_(::hfe_emu::SHFL, mask, v, src);
}
template <typename V> inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  return shfl_(::hfe_emu::SHFL_XOR, mask, v, ::hfe_emu::me().lane ^ lane_mask);
}

// ------------------------------------------------------------------------------------------------ quant_mma_ptx.cuh
namespace hfe_mma {

template <typename T> inline float emu_half(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
  if constexpr (std::is_same<T, __half>::value) return __half2float(__half{bits});
  else return __bfloat162float(__nv_bfloat16{bits});
}

// m16n8k16, A row-major 16x16 (a0: row g, K 2t..2t+1; a1: row g+8; a2, a3: K + 8), B 16x8 (b0: K 2t..2t+1 of
// column g; b1: K + 8), D 16x8 (d0, d1: row g, columns 2t, 2t+1; d2, d3: row g+8), g = lane/4, t = lane%4.
template <typename T>
inline void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const uint32_t* all =
      ::hfe_emu::exchange(std::is_same<T, __half>::value ? ::hfe_emu::MMA_F16 : ::hfe_emu::MMA_BF16, mine);
  const int lane = ::hfe_emu::me().lane, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) {
      const int ka = (k & 7) >> 1, hi = k & 1;
      const uint32_t a = all[((row & 7) * 4 + ka) * ::hfe_emu::XW + (row >> 3) + 2 * (k >> 3)];
      const uint32_t b = all[(col * 4 + ka) * ::hfe_emu::XW + 4 + (k >> 3)];
      acc += emu_half<T>(a, hi) * emu_half<T>(b, hi);
    }
    d[i] = acc;
  }
}

inline void cp_async16(uint32_t dst, const void* src, int src_bytes = 16) {
  ::hfe_emu::smem_at(dst, 16);  // checks the destination now
  if (src_bytes < 0 || src_bytes > 16) ::hfe_emu::fail("cp.async of " + std::to_string(src_bytes) + " bytes");
  if (src_bytes) {
    if (reinterpret_cast<uintptr_t>(src) % 16) ::hfe_emu::fail("cp.async from a source that is not 16-byte aligned");
    ::hfe_emu::check_region(src, src_bytes);
  }
  ::hfe_emu::me().open.push_back({dst, src, src_bytes});
}
inline void cp_async_commit() {
  ::hfe_emu::Fiber& f = ::hfe_emu::me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N> inline void cp_async_wait() {
  ::hfe_emu::Fiber& f = ::hfe_emu::me();
  while (f.groups.size() > static_cast<size_t>(N)) {
    ::hfe_emu::land(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

inline uint32_t pin(uint32_t v) { return v; }
inline uint32_t shared_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
inline uint32_t lds32(uint32_t a) {
  uint32_t v;
  memcpy(&v, ::hfe_emu::smem_at(a, 4), 4);
  return v;
}
inline uint2 lds64(uint32_t a) {
  uint2 v;
  memcpy(&v, ::hfe_emu::smem_at(a, 8), 8);
  return v;
}
inline uint4 lds128(uint32_t a) {
  uint4 v;
  memcpy(&v, ::hfe_emu::smem_at(a, 16), 16);
  return v;
}

// ldmatrix .x4: lane i addresses row i % 8 of matrix i / 8 (16 bytes); register j of lane l gets matrix j's row
// l / 4, 32 bits at byte 4 (l % 4).
inline void ldsm_x4(uint32_t (&r)[4], uint32_t a) {
  const uint32_t mine[1] = {a};
  const uint32_t* all = ::hfe_emu::exchange(::hfe_emu::LDSM, mine);
  const int lane = ::hfe_emu::me().lane;
  for (int j = 0; j < 4; ++j) {
    const uint32_t row = all[(8 * j + lane / 4) * ::hfe_emu::XW];
    if (row % 16) ::hfe_emu::fail("ldmatrix row address not 16-byte aligned");
    r[j] = lds32(row + 4 * (lane % 4));
  }
}

template <uint32_t MASK> inline uint32_t and_or(uint32_t a, uint32_t b) { return (a & MASK) | b; }
inline uint32_t sign_mask2(uint32_t v) { return (v & 0x8000u ? 0xFFFFu : 0u) | (v & 0x80000000u ? 0xFFFF0000u : 0u); }

}  // namespace hfe_mma
