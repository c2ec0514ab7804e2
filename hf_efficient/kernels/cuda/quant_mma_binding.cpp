// Python binding of the mixed-input MMA kernel (kernels/cuda/quant_mma.cuh): validates shapes and dtypes with
// actionable errors, then launches on the current stream. Called by hf_efficient.kernels.quant_mma, which owns the
// torch.library op, the layout and the choice of splits.
// Built with -DHFE_MMA_EMULATE, the same binding runs the kernel on CPU tensors through quant_mma_emu.h (tests).
#include <torch/extension.h>
#ifdef HFE_MMA_EMULATE
#define HFE_DEVICE "CPU"
#define HFE_ON_DEVICE(t) (t).is_cpu()
#define HFE_STREAM nullptr
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define HFE_DEVICE "CUDA"
#define HFE_ON_DEVICE(t) (t).is_cuda()
#define HFE_STREAM at::cuda::getCurrentCUDAStream()
#endif
#include <stdint.h>

#include "quant_mma_args.h"

torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qw, torch::Tensor params, torch::Tensor table,
                        torch::Tensor counters, int64_t N, int64_t K, int64_t bits, int64_t group, int64_t mode,
                        int64_t splits) {
  TORCH_CHECK(HFE_ON_DEVICE(x) && x.dim() == 2 && x.size(1) == K, "quant_mma: x must be a " HFE_DEVICE " (M, ", K,
              ") tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "quant_mma: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "quant_mma: x must be contiguous along K");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "quant_mma: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(mode == hfe_mma::MODE_SYM || mode == hfe_mma::MODE_ZERO || mode == hfe_mma::MODE_TWO,
              "quant_mma: mode must be ", hfe_mma::MODE_SYM, ", ", hfe_mma::MODE_ZERO, " or ", hfe_mma::MODE_TWO, ", got ", mode);
  TORCH_CHECK(group % 16 == 0 && group > 0, "quant_mma: group must be a positive multiple of 16, got ", group);
  TORCH_CHECK(HFE_ON_DEVICE(qw) && qw.scalar_type() == at::kInt && qw.dim() == 5 && qw.size(2) == 16 && qw.size(3) == 4,
              "quant_mma: qweight must be int32 (Ntiles, KB, 16, 4, words), got ", qw.sizes());
  TORCH_CHECK(HFE_ON_DEVICE(params) && params.dim() == 4 && params.size(2) == 16 && params.size(3) == 2 &&
                  (params.scalar_type() == at::kHalf || params.scalar_type() == at::kFloat),
              "quant_mma: params must be float16/float32 (Ntiles, NG, 16, 2), got ", params.sizes(), " ",
              params.scalar_type());
  // No table: the 4-bit identity grid with a zero point at bfloat16, decoded by arithmetic (IntDecode in
  // quant_mma.cuh).
  const bool int_decode = table.numel() == 0;
  TORCH_CHECK(!int_decode || (bits == 4 && mode == hfe_mma::MODE_ZERO && x.scalar_type() == at::kBFloat16),
              "quant_mma: only 4-bit zero-point weights (mode ", hfe_mma::MODE_ZERO, ") with bfloat16 activations decode without a pair "
              "table, got bits=", bits, ", mode=", mode, ", x ", x.scalar_type());
  TORCH_CHECK(HFE_ON_DEVICE(table) && table.scalar_type() == at::kInt &&
                  (int_decode || table.numel() == (1 << (2 * bits))),
              "quant_mma: table must hold 4**bits int32 pair entries (or none, see above)");
  TORCH_CHECK(qw.is_contiguous() && params.is_contiguous() && table.is_contiguous(),
              "quant_mma: weight tensors must be contiguous");
  const int64_t Ntiles = qw.size(0), KB = qw.size(1), M = x.size(0);
  TORCH_CHECK(Ntiles * 16 >= N && KB * 128 >= K && params.size(0) == Ntiles, "quant_mma: weight shape ",
              qw.sizes(), " does not cover N=", N, ", K=", K);
  TORCH_CHECK(splits >= 1, "quant_mma: splits must be >= 1");
  // The kernel copies each group's parameters into shared memory as 16-byte units.
  if (reinterpret_cast<uintptr_t>(params.data_ptr()) % 16) params = params.clone();
#ifndef HFE_MMA_EMULATE
  c10::cuda::CUDAGuard guard(x.device());
#endif
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t mt_rows = 8 * hfe_mma::mtiles_for((int)M);
  const int64_t cta_tiles =
      hfe_mma::WARPS * hfe_mma::tiles_per_warp((int)M, x.scalar_type() == at::kBFloat16, (int)group);
  const int64_t row_ctas = (Ntiles + cta_tiles - 1) / cta_tiles, mtiles = (M + mt_rows - 1) / mt_rows;
  const int64_t bps = (KB + splits - 1) / splits, S = (KB + bps - 1) / bps;
  torch::Tensor ws;
  if (S > 1) {
    TORCH_CHECK(HFE_ON_DEVICE(counters) && counters.scalar_type() == at::kInt &&
                    counters.numel() >= row_ctas * mtiles,
                "quant_mma: counters must be a zeroed int32 " HFE_DEVICE " buffer of at least ", row_ctas * mtiles,
                " entries");
    ws = torch::empty({S, M, Ntiles * 16}, x.options().dtype(at::kFloat));
  }
  hfe_mma::Args a{x.data_ptr(), (int)M, (int)K, (int)x.stride(0),
                  reinterpret_cast<const uint32_t*>(qw.data_ptr<int>()), params.data_ptr(),
                  int_decode ? nullptr : reinterpret_cast<const uint32_t*>(table.data_ptr<int>()), y.data_ptr(),
                  (int)N, (int)Ntiles,
                  (int)KB, (int)group, (int)params.size(1), (int)bps, (int)S, S > 1 ? ws.data_ptr<float>() : nullptr,
                  S > 1 ? counters.data_ptr<int>() : nullptr, x.scalar_type() == at::kBFloat16,
                  params.scalar_type() == at::kFloat, HFE_STREAM};
#ifdef HFE_MMA_EMULATE
  auto bytes = [](const torch::Tensor& t) { return std::make_pair((const void*)t.data_ptr(), (size_t)t.nbytes()); };
  const hfe_emu::Regions readable({bytes(x), bytes(qw), bytes(params), bytes(table)});
#endif
  switch (bits * 3 + mode) {
    case 6: hfe_mma::launch<2, 0>(a); break;
    case 7: hfe_mma::launch<2, 1>(a); break;
    case 8: hfe_mma::launch<2, 2>(a); break;
    case 9: hfe_mma::launch<3, 0>(a); break;
    case 10: hfe_mma::launch<3, 1>(a); break;
    case 11: hfe_mma::launch<3, 2>(a); break;
    case 12: hfe_mma::launch<4, 0>(a); break;
    case 13: hfe_mma::launch<4, 1>(a); break;
    case 14: hfe_mma::launch<4, 2>(a); break;
  }
#ifndef HFE_MMA_EMULATE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("quant_mma", &quant_mma, "low-bit weight x activations (mma)"); }
