// The glyph_engine::dpmpp_step op: schema, input checks, and the CPU implementation.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "dpmpp_step.h"

namespace glyph_engine {

void check_inputs(const at::Tensor& x, const at::Tensor& eps_cond, const std::optional<at::Tensor>& eps_uncond,
                  const std::optional<at::Tensor>& x0_prev) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf,
              "dpmpp_step: x must be float32 or float16, got ", x.scalar_type());
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes(), "dpmpp_step: ", name, " has shape ", t.sizes(), ", x has ", x.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "dpmpp_step: ", name, " is ", t.scalar_type(), ", x is ",
                x.scalar_type(), "; cast it to x's dtype");
    TORCH_CHECK(t.device() == x.device(), "dpmpp_step: ", name, " is on ", t.device(), ", x on ", x.device());
    TORCH_CHECK(t.is_contiguous(), "dpmpp_step: ", name, " is not contiguous; call .contiguous() first");
  };
  check(x, "x");
  check(eps_cond, "eps_cond");
  if (eps_uncond) check(*eps_uncond, "eps_uncond");
  if (x0_prev) check(*x0_prev, "x0_prev");
}

StepParams make_params(double guidance, double x_scale, double eps_scale, double a, double b, double c,
                       std::optional<double> clamp_min, std::optional<double> clamp_max, bool guided,
                       bool second_order) {
  TORCH_CHECK(clamp_min.has_value() == clamp_max.has_value(), "dpmpp_step: give both clamp bounds or neither");
  return StepParams{float(guidance), float(x_scale), float(eps_scale), float(a), float(b), float(c),
                    float(clamp_min.value_or(0.0)), float(clamp_max.value_or(0.0)), guided, second_order,
                    clamp_min.has_value()};
}

namespace {

// One contiguous range. Scalars by value and __restrict__ pointers: the compiler may then
// keep the scalars in registers and vectorize, knowing that stores cannot alias them.
template <typename T, bool Guided, bool SecondOrder, bool Clamp>
void step_range(const T* __restrict__ x, const T* __restrict__ ec, const T* __restrict__ eu,
                const T* __restrict__ xp, T* __restrict__ xn, T* __restrict__ x0, int64_t begin, int64_t end,
                const float g, const float xs, const float es, const float a, const float b, const float c,
                const float lo, const float hi) {
  for (int64_t i = begin; i < end; ++i) {
    const float xv = static_cast<float>(x[i]);
    float eps = static_cast<float>(ec[i]);
    if (Guided) {
      const float u = static_cast<float>(eu[i]);
      eps = u + g * (eps - u);
    }
    float x0v = xs * xv - es * eps;
    // std::max(v, lo) and std::min(v, hi) return their first argument when the comparison is
    // false, as it is for NaN: NaN passes through as in torch.clamp. Swapped, they would
    // return the bound.
    if (Clamp) x0v = std::min(std::max(x0v, lo), hi);
    float next = a * xv + b * x0v;
    if (SecondOrder) next += c * static_cast<float>(xp[i]);
    xn[i] = static_cast<T>(next);
    x0[i] = static_cast<T>(x0v);
  }
}

template <typename T, bool Guided, bool SecondOrder, bool Clamp>
void step_cpu(const T* x, const T* ec, const T* eu, const T* xp, T* xn, T* x0, int64_t n, const StepParams& p) {
  // Chunks of 32K elements: large enough to amortise thread start-up, small enough to split
  // one 128x128 glyph batch across cores. The flags are template arguments, so the inner
  // loop is branch-free.
  const StepParams q = p;
  at::parallel_for(0, n, 1 << 15, [=](int64_t begin, int64_t end) {
    step_range<T, Guided, SecondOrder, Clamp>(x, ec, eu, xp, xn, x0, begin, end, q.guidance, q.x_scale, q.eps_scale,
                                              q.a, q.b, q.c, q.clamp_min, q.clamp_max);
  });
}

template <typename T>
void step_cpu_dispatch(const T* x, const T* ec, const T* eu, const T* xp, T* xn, T* x0, int64_t n,
                       const StepParams& p) {
#define GLYPH_STEP(G, S, C)                                  \
  if (p.guided == G && p.second_order == S && p.clamp == C) { \
    step_cpu<T, G, S, C>(x, ec, eu, xp, xn, x0, n, p);        \
    return;                                                   \
  }
  GLYPH_STEP(true, true, false)
  GLYPH_STEP(true, false, false)
  GLYPH_STEP(false, true, false)
  GLYPH_STEP(false, false, false)
  GLYPH_STEP(true, true, true)
  GLYPH_STEP(true, false, true)
  GLYPH_STEP(false, true, true)
  GLYPH_STEP(false, false, true)
#undef GLYPH_STEP
}

std::tuple<at::Tensor, at::Tensor> dpmpp_step_cpu(const at::Tensor& x, const at::Tensor& eps_cond,
                                                  const std::optional<at::Tensor>& eps_uncond,
                                                  const std::optional<at::Tensor>& x0_prev, double guidance,
                                                  double x_scale, double eps_scale, double a, double b, double c,
                                                  std::optional<double> clamp_min, std::optional<double> clamp_max) {
  check_inputs(x, eps_cond, eps_uncond, x0_prev);
  TORCH_CHECK(x.device().is_cpu(), "dpmpp_step (CPU): x must be on the CPU");
  StepParams p = make_params(guidance, x_scale, eps_scale, a, b, c, clamp_min, clamp_max, eps_uncond.has_value(),
                             x0_prev.has_value());
  at::Tensor x_next = at::empty_like(x);
  at::Tensor x0 = at::empty_like(x);
  int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    step_cpu_dispatch<float>(x.const_data_ptr<float>(), eps_cond.const_data_ptr<float>(),
                             eps_uncond ? eps_uncond->const_data_ptr<float>() : nullptr,
                             x0_prev ? x0_prev->const_data_ptr<float>() : nullptr, x_next.mutable_data_ptr<float>(),
                             x0.mutable_data_ptr<float>(), n, p);
  } else {
    using H = at::Half;
    step_cpu_dispatch<H>(x.const_data_ptr<H>(), eps_cond.const_data_ptr<H>(),
                         eps_uncond ? eps_uncond->const_data_ptr<H>() : nullptr,
                         x0_prev ? x0_prev->const_data_ptr<H>() : nullptr, x_next.mutable_data_ptr<H>(),
                         x0.mutable_data_ptr<H>(), n, p);
  }
  return {x_next, x0};
}

// Shapes only: meta tensors, and the fake tensors torch.compile traces with, run this (registered
// here rather than from Python, where it cost 13 ms of every start).
std::tuple<at::Tensor, at::Tensor> dpmpp_step_meta(const at::Tensor& x, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                   double, double, double, double, double, double, std::optional<double>,
                                                   std::optional<double>) {
  return {at::empty_like(x), at::empty_like(x)};
}

}  // namespace

TORCH_LIBRARY(glyph_engine, m) {
  m.def(
      "dpmpp_step(Tensor x, Tensor eps_cond, Tensor? eps_uncond, Tensor? x0_prev, float guidance, "
      "float x_scale, float eps_scale, float a, float b, float c, float? clamp_min, float? clamp_max) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(glyph_engine, CPU, m) { m.impl("dpmpp_step", &dpmpp_step_cpu); }

TORCH_LIBRARY_IMPL(glyph_engine, Meta, m) { m.impl("dpmpp_step", &dpmpp_step_meta); }

}  // namespace glyph_engine
