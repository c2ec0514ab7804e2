// fp16-weight matmul engines: y = x @ W^T with W stored as IEEE half (N, K) and x, y float32.
//
// For float tables kept in half precision to halve their memory (e.g. a tied embedding / output head,
// hf_efficient.quantization.lut.half): each weight is widened to float exactly (vcvtph2ps) and multiplied in
// float32, so the only difference from a float32 matmul on the widened weight is the order of the sums.
// Decode (a few activation rows) is memory-bound: the kernels stream the half rows once and apply them to
// every activation row. Larger inputs widen row blocks into a float buffer for the BLAS GEMM instead
// (csrc/lut_gemm.cpp, half_to_float_rows here).
#include "engine.h"

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace hf_efficient {
namespace lut {

namespace {

constexpr int kRowBlock = 4;  // weight rows per pass: their loads share each activation vector

using RowsFn = void (*)(const float* x, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy);

// The activation rows in groups of up to 4 (kernel Kj takes j rows: 4 x kRowBlock accumulators at most).
template <RowsFn K1, RowsFn K2, RowsFn K3, RowsFn K4>
void rows_in_fours(const float* x, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
                   int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) K4(x + m * K, w, K, n0, n1, y + m * ldy, ldy);
  const RowsFn rest[4] = {nullptr, K1, K2, K3};
  if (M > m) rest[M - m](x + m * K, w, K, n0, n1, y + m * ldy, ldy);
}

template <int MM>
void half_rows_scalar_mm(const float* x, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    float acc[MM] = {};
    const uint16_t* wr = w + n * K;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = half_to_float(wr[k]);
      for (int m = 0; m < MM; ++m) acc[m] = std::fma(x[m * K + k], wk, acc[m]);
    }
    for (int m = 0; m < MM; ++m) y[m * ldy + n] = acc[m];
  }
}

void half_rows_scalar(const float* x, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) half_rows_scalar_mm<1>(x + m * K, w, K, n0, n1, y + m * ldy, ldy);
}

void half_to_float_scalar(const uint16_t* w, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = half_to_float(w[i]);
}

#if defined(__x86_64__) || defined(__i386__)
#define HFE_HALF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HFE_HALF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// MM activation rows (1..4) against weight rows [n0, n1): kRowBlock rows at a time, MM x kRowBlock
// accumulators of 8 lanes; the K tail (K % 8) in scalar.
template <int MM>
HFE_HALF_AVX2 void half_rows_avx2_mm(const float* x, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
                                     int64_t ldy) {
  const int64_t K8 = K / 8 * 8;
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    __m256 acc[MM][kRowBlock];
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < kRowBlock; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv[kRowBlock];
      for (int r = 0; r < kRowBlock; ++r)
        wv[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * K + k)));
      for (int m = 0; m < MM; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < kRowBlock; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < kRowBlock; ++r) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc[m][r]);
        float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (int64_t k = K8; k < K; ++k) s = std::fma(x[m * K + k], half_to_float(w[(n + r) * K + k]), s);
        y[m * ldy + n + r] = s;
      }
  }
  if (n < n1) half_rows_scalar_mm<MM>(x, w, K, n, n1, y, ldy);
}

HFE_HALF_AVX2 void half_to_float_avx2(const uint16_t* w, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))));
  for (; i < count; ++i) out[i] = half_to_float(w[i]);
}

// The AVX2 kernel on 16 lanes; the K tail is a masked load (zeros beyond K), so no scalar tail.
template <int MM>
HFE_HALF_AVX512 void half_rows_avx512_mm(const float* x, const uint16_t* w, int64_t K, int64_t n0, int64_t n1,
                                         float* y, int64_t ldy) {
  const int64_t K16 = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    __m512 acc[MM][kRowBlock];
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < kRowBlock; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = k < K16 ? static_cast<__mmask16>(0xFFFF) : tail;
      __m512 wv[kRowBlock];
      for (int r = 0; r < kRowBlock; ++r)
        wv[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w + (n + r) * K + k));
      for (int m = 0; m < MM; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        for (int r = 0; r < kRowBlock; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < kRowBlock; ++r) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[m][r]);
  }
  for (; n < n1; ++n) {
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = k < K16 ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w + n * K + k));
      for (int m = 0; m < MM; ++m) acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k), wv, acc[m]);
    }
    for (int m = 0; m < MM; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

#endif

}  // namespace

HalfEngine select_half_engine(Isa cap) {
  HalfEngine e{&half_rows_scalar, &half_to_float_scalar, Isa::kScalar};
#if defined(__x86_64__) || defined(__i386__)
  if (cap == Isa::kAvx512)
    return HalfEngine{&rows_in_fours<half_rows_avx512_mm<1>, half_rows_avx512_mm<2>, half_rows_avx512_mm<3>,
                                     half_rows_avx512_mm<4>>,
                      &half_to_float_avx2, Isa::kAvx512};
  if (cap == Isa::kAvx2)
    return HalfEngine{&rows_in_fours<half_rows_avx2_mm<1>, half_rows_avx2_mm<2>, half_rows_avx2_mm<3>,
                                     half_rows_avx2_mm<4>>,
                      &half_to_float_avx2, Isa::kAvx2};
#endif
  return e;
}

}  // namespace lut
}  // namespace hf_efficient
