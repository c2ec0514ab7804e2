// Memory helpers for the streaming LUT kernels.
//
// hugepage_empty(nbytes) -> uint8 tensor: storage for a weight stream that is read front to back at every
// decode step, placed in transparent huge pages where the OS allows it (Linux madvise; elsewhere a plain
// allocation). With 4 KiB pages a DRAM-bound stream pays a page walk every 64 lines and the hardware
// prefetcher stops at each page boundary. On the machine measured, 2 MiB pages made a DRAM-resident
// 4096x4096 INT2 GEMV 1.10-1.13x faster in a same-run ablation (docs/lut.md). The tensor is a view into a
// slightly larger buffer, aligned to 2 MiB; a stream smaller than a huge page starts on a 4 KiB page boundary
// (where a stream starts within its page changes how fast the prefetchers read it: docs/lut.md, round 12).
//
// read_probe(buf) -> int64: a memory-read bandwidth probe for the LUT benchmarks' bound.
// It streams every byte of a buffer through 32-byte loads into four independent OR accumulators
// (split over torch's threads), so its time is the machine's sequential read rate, not arithmetic: a
// float sum is compute-bound on some CPUs and under-reports bandwidth. The returned checksum (all words
// OR-ed together) keeps the loads from being optimised away and is what tests compare.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hf_efficient {

at::Tensor hugepage_empty(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "hugepage_empty: nbytes must be >= 0, got ", nbytes);
  constexpr int64_t kHuge = int64_t(2) << 20, kPage = 4096;
  if (nbytes == 0) return at::empty({0}, at::kByte);
  const int64_t align = nbytes < kHuge ? kPage : kHuge;  // a huge page would be mostly unused
  at::Tensor buf = at::empty({nbytes + align}, at::kByte);
  const auto base = reinterpret_cast<uintptr_t>(buf.data_ptr());
  const int64_t off = static_cast<int64_t>((align - base % align) % align);
  if (align < kHuge) return buf.narrow(0, off, nbytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: where THP is disabled this fails or does nothing, and the buffer is simply 4 KiB-paged.
  // The pages are untouched until the caller fills them, so the advice applies to their first fault.
  (void)madvise(reinterpret_cast<void*>(base + off), static_cast<size_t>(nbytes / kHuge * kHuge), MADV_HUGEPAGE);
#endif
  return buf.narrow(0, off, nbytes);
}

static uint64_t or_words_scalar(const uint8_t* p, int64_t n) {
  uint64_t acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] |= v;
    }
  uint64_t out = acc[0] | acc[1] | acc[2] | acc[3];
  for (; i < n; ++i) out |= static_cast<uint64_t>(p[i]) << (8 * (i % 8));
  return out;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) static uint64_t or_words_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_or_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_or_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_or_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_or_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t w[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3)));
  // The tail starts at a multiple of 128, so its byte positions mod 8 match the scalar loop's.
  return w[0] | w[1] | w[2] | w[3] | or_words_scalar(p + i, n - i);
}
#endif

int64_t read_probe(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "read_probe: buf must be a contiguous CPU tensor");
  const auto* p = static_cast<const uint8_t*>(buf.data_ptr());
  const int64_t n = buf.numel() * buf.element_size();
#if defined(__x86_64__) || defined(__i386__)
  const bool avx2 = __builtin_cpu_supports("avx2");
#else
  const bool avx2 = false;
#endif
  constexpr int64_t kChunk = int64_t(1) << 20;  // 1 MiB per task, a multiple of 128: chunks OR in any order
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<uint64_t> part(static_cast<size_t>(chunks), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
#if defined(__x86_64__) || defined(__i386__)
      part[c] = avx2 ? or_words_avx2(p + off, len) : or_words_scalar(p + off, len);
#else
      part[c] = or_words_scalar(p + off, len);
#endif
    }
  });
  uint64_t out = 0;
  for (uint64_t v : part) out |= v;
  return static_cast<int64_t>(out);
}

}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("read_probe(Tensor buf) -> int");
  m.def("hugepage_empty(int nbytes) -> Tensor", &hf_efficient::hugepage_empty);
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("read_probe", &hf_efficient::read_probe);
}
