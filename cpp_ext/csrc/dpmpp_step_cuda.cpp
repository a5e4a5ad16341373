// CUDA registration of glyph_engine::dpmpp_step: checks, then the launcher in
// dpmpp_step_kernel.cu on torch's current stream. Compiled only when PyTorch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <optional>
#include <tuple>

#include "dpmpp_step.h"

namespace glyph_engine {

cudaError_t launch_dpmpp_step_f32(const float* x, const float* eps_cond, const float* eps_uncond, const float* x0_prev,
                                  float* x_next, float* x0, int64_t n, StepParams p, int device, cudaStream_t stream);
cudaError_t launch_dpmpp_step_f16(const void* x, const void* eps_cond, const void* eps_uncond, const void* x0_prev,
                                  void* x_next, void* x0, int64_t n, StepParams p, int device, cudaStream_t stream);
void check_inputs(const at::Tensor& x, const at::Tensor& eps_cond, const std::optional<at::Tensor>& eps_uncond,
                  const std::optional<at::Tensor>& x0_prev);
StepParams make_params(double guidance, double x_scale, double eps_scale, double a, double b, double c,
                       std::optional<double> clamp_min, std::optional<double> clamp_max, bool guided,
                       bool second_order);

namespace {

std::tuple<at::Tensor, at::Tensor> dpmpp_step_cuda(const at::Tensor& x, const at::Tensor& eps_cond,
                                                   const std::optional<at::Tensor>& eps_uncond,
                                                   const std::optional<at::Tensor>& x0_prev, double guidance,
                                                   double x_scale, double eps_scale, double a, double b, double c,
                                                   std::optional<double> clamp_min, std::optional<double> clamp_max) {
  check_inputs(x, eps_cond, eps_uncond, x0_prev);
  TORCH_CHECK(x.is_cuda(), "dpmpp_step (CUDA): x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  StepParams p = make_params(guidance, x_scale, eps_scale, a, b, c, clamp_min, clamp_max, eps_uncond.has_value(),
                             x0_prev.has_value());
  at::Tensor x_next = at::empty_like(x);
  at::Tensor x0 = at::empty_like(x);
  const int device = x.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const void* eu = eps_uncond ? eps_uncond->const_data_ptr() : nullptr;
  const void* xp = x0_prev ? x0_prev->const_data_ptr() : nullptr;
  cudaError_t status;
  if (x.scalar_type() == at::kFloat) {
    status = launch_dpmpp_step_f32(x.const_data_ptr<float>(), eps_cond.const_data_ptr<float>(),
                                   static_cast<const float*>(eu), static_cast<const float*>(xp),
                                   x_next.mutable_data_ptr<float>(), x0.mutable_data_ptr<float>(), x.numel(), p, device,
                                   stream);
  } else {
    status = launch_dpmpp_step_f16(x.const_data_ptr(), eps_cond.const_data_ptr(), eu, xp, x_next.mutable_data_ptr(),
                                   x0.mutable_data_ptr(), x.numel(), p, device, stream);
  }
  TORCH_CHECK(status == cudaSuccess, "dpmpp_step (CUDA): kernel launch failed: ", cudaGetErrorString(status));
  return {x_next, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(glyph_engine, CUDA, m) { m.impl("dpmpp_step", &dpmpp_step_cuda); }

}  // namespace glyph_engine
