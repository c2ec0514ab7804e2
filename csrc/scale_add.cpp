// scale_add(x, y, alpha) = alpha * x + y: the smallest real op, proving the csrc/ build path,
// torch.library registration and thread parallelism. Later CPU kernels follow the same shape.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace hf_efficient {

at::Tensor scale_add_cpu(const at::Tensor& x, const at::Tensor& y, double alpha) {
  TORCH_CHECK(x.sizes() == y.sizes(), "scale_add: x and y must have the same shape, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "scale_add: x and y must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "scale_add: CPU kernel got a non-CPU tensor");
  at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_add_cpu", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* py = yc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    // Accumulate in float for the 16-bit types so the result equals the fp32 reference rounded once.
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = static_cast<acc_t>(alpha);
    at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        po[i] = static_cast<scalar_t>(a * static_cast<acc_t>(px[i]) + static_cast<acc_t>(py[i]));
      }
    });
  });
  return out;
}

}  // namespace hf_efficient

TORCH_LIBRARY_FRAGMENT(hf_efficient, m) {
  m.def("scale_add(Tensor x, Tensor y, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_efficient, CPU, m) {
  m.impl("scale_add", &hf_efficient::scale_add_cpu);
}
