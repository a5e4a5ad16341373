// CUDA implementation of the fused DPM-Solver++ step. Includes only CUDA headers, so it
// compiles with nvcc without PyTorch's CUDA build; dpmpp_step_cuda.cpp binds it to torch.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "dpmpp_step.h"

namespace glyph_engine {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// torch.clamp's semantics: NaN stays NaN, where fminf/fmaxf alone would return a bound and
// hide a diverged sample behind a valid-looking pixel.
__host__ __device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) {
  return isnan(v) ? v : fminf(fmaxf(v, lo), hi);
}

// __host__ too, so a host-only test harness can check the per-element math without a GPU.
template <bool Guided, bool SecondOrder, bool Clamp>
__host__ __device__ __forceinline__ void step_one(float x, float ec, float eu, float xp, const StepParams& p,
                                                  float& x_next, float& x0) {
  float eps = Guided ? eu + p.guidance * (ec - eu) : ec;
  x0 = p.x_scale * x - p.eps_scale * eps;
  if (Clamp) x0 = clamp_keep_nan(x0, p.clamp_min, p.clamp_max);
  x_next = p.a * x + p.b * x0;
  if (SecondOrder) x_next += p.c * xp;
}

// Scalar path: any alignment and size; grid-stride loop.
template <typename T, bool Guided, bool SecondOrder, bool Clamp>
__global__ void step_scalar(const T* __restrict__ x, const T* __restrict__ ec, const T* __restrict__ eu,
                            const T* __restrict__ xp, T* __restrict__ x_next, T* __restrict__ x0, int64_t n,
                            StepParams p) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float xn, x0v;
    step_one<Guided, SecondOrder, Clamp>(to_float(x[i]), to_float(ec[i]), Guided ? to_float(eu[i]) : 0.f,
                                         SecondOrder ? to_float(xp[i]) : 0.f, p, xn, x0v);
    x_next[i] = from_float<T>(xn);
    x0[i] = from_float<T>(x0v);
  }
}

// Vector path, FP32: float4 loads and stores (16-byte aligned pointers, n % 4 == 0).
template <bool Guided, bool SecondOrder, bool Clamp>
__global__ void step_float4(const float4* __restrict__ x, const float4* __restrict__ ec,
                            const float4* __restrict__ eu, const float4* __restrict__ xp,
                            float4* __restrict__ x_next, float4* __restrict__ x0, int64_t n4, StepParams p) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    float4 xv = x[i], cv = ec[i];
    float4 uv = Guided ? eu[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    float4 pv = SecondOrder ? xp[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    float4 xn, x0v;
    step_one<Guided, SecondOrder, Clamp>(xv.x, cv.x, uv.x, pv.x, p, xn.x, x0v.x);
    step_one<Guided, SecondOrder, Clamp>(xv.y, cv.y, uv.y, pv.y, p, xn.y, x0v.y);
    step_one<Guided, SecondOrder, Clamp>(xv.z, cv.z, uv.z, pv.z, p, xn.z, x0v.z);
    step_one<Guided, SecondOrder, Clamp>(xv.w, cv.w, uv.w, pv.w, p, xn.w, x0v.w);
    x_next[i] = xn;
    x0[i] = x0v;
  }
}

// Vector path, FP16: half2 loads and stores (4-byte aligned pointers, n % 2 == 0).
template <bool Guided, bool SecondOrder, bool Clamp>
__global__ void step_half2(const __half2* __restrict__ x, const __half2* __restrict__ ec,
                           const __half2* __restrict__ eu, const __half2* __restrict__ xp,
                           __half2* __restrict__ x_next, __half2* __restrict__ x0, int64_t n2, StepParams p) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += (int64_t)gridDim.x * blockDim.x) {
    float2 xv = __half22float2(x[i]), cv = __half22float2(ec[i]);
    float2 uv = Guided ? __half22float2(eu[i]) : make_float2(0.f, 0.f);
    float2 pv = SecondOrder ? __half22float2(xp[i]) : make_float2(0.f, 0.f);
    float2 xn, x0v;
    step_one<Guided, SecondOrder, Clamp>(xv.x, cv.x, uv.x, pv.x, p, xn.x, x0v.x);
    step_one<Guided, SecondOrder, Clamp>(xv.y, cv.y, uv.y, pv.y, p, xn.y, x0v.y);
    x_next[i] = __floats2half2_rn(xn.x, xn.y);
    x0[i] = __floats2half2_rn(x0v.x, x0v.y);
  }
}

bool aligned(const void* ptr, uintptr_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The multiprocessor count of a device, queried once per device and process rather than on
// every launch (the step runs once per sampler iteration; the count never changes). A failed
// query gives 0, so one block, and leaves its error for the launcher's cudaGetLastError.
// Devices beyond the table (more than any machine has) are queried every time.
int multiprocessors(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag queried[kMaxDevices];
  static int count[kMaxDevices];
  auto query = [](int d) {
    int sms = 0;
    return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d) == cudaSuccess ? sms : 0;
  };
  if (device < 0 || device >= kMaxDevices) return query(device);
  std::call_once(queried[device], [&] { count[device] = query(device); });
  return count[device];
}

// Enough blocks to fill the device a few times over; the grid-stride loops cover the rest.
int grid_for(int64_t work, int threads, int device) {
  int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(multiprocessors(device)) * 8)));
}

template <bool G, bool S, bool C>
void launch_f32(const float* x, const float* ec, const float* eu, const float* xp, float* xn, float* x0, int64_t n,
                const StepParams& p, int device, cudaStream_t stream) {
  constexpr int kThreads = 256;
  bool vec = n % 4 == 0 && aligned(x, 16) && aligned(ec, 16) && aligned(eu, 16) && aligned(xp, 16) &&
             aligned(xn, 16) && aligned(x0, 16);
  if (vec) {
    int64_t n4 = n / 4;
    step_float4<G, S, C><<<grid_for(n4, kThreads, device), kThreads, 0, stream>>>(
        reinterpret_cast<const float4*>(x), reinterpret_cast<const float4*>(ec), reinterpret_cast<const float4*>(eu),
        reinterpret_cast<const float4*>(xp), reinterpret_cast<float4*>(xn), reinterpret_cast<float4*>(x0), n4, p);
  } else {
    step_scalar<float, G, S, C><<<grid_for(n, kThreads, device), kThreads, 0, stream>>>(x, ec, eu, xp, xn, x0, n, p);
  }
}

template <bool G, bool S, bool C>
void launch_f16(const __half* x, const __half* ec, const __half* eu, const __half* xp, __half* xn, __half* x0,
                int64_t n, const StepParams& p, int device, cudaStream_t stream) {
  constexpr int kThreads = 256;
  bool vec = n % 2 == 0 && aligned(x, 4) && aligned(ec, 4) && aligned(eu, 4) && aligned(xp, 4) && aligned(xn, 4) &&
             aligned(x0, 4);
  if (vec) {
    int64_t n2 = n / 2;
    step_half2<G, S, C><<<grid_for(n2, kThreads, device), kThreads, 0, stream>>>(
        reinterpret_cast<const __half2*>(x), reinterpret_cast<const __half2*>(ec),
        reinterpret_cast<const __half2*>(eu), reinterpret_cast<const __half2*>(xp), reinterpret_cast<__half2*>(xn),
        reinterpret_cast<__half2*>(x0), n2, p);
  } else {
    step_scalar<__half, G, S, C><<<grid_for(n, kThreads, device), kThreads, 0, stream>>>(x, ec, eu, xp, xn, x0, n, p);
  }
}

template <typename T>
struct Launch {
  const T *x, *ec, *eu, *xp;
  T *xn, *x0;
  int64_t n;
  const StepParams& p;
  int device;
  cudaStream_t stream;
  template <bool G, bool S, bool C>
  void run() const {
    if constexpr (sizeof(T) == 4) {
      launch_f32<G, S, C>(x, ec, eu, xp, xn, x0, n, p, device, stream);
    } else {
      launch_f16<G, S, C>(x, ec, eu, xp, xn, x0, n, p, device, stream);
    }
  }
};

// Turns the three runtime flags into template arguments, so no branch is left in the loop.
template <typename L>
void dispatch_flags(const StepParams& p, const L& l) {
  if (p.guided) {
    if (p.second_order) {
      p.clamp ? l.template run<true, true, true>() : l.template run<true, true, false>();
    } else {
      p.clamp ? l.template run<true, false, true>() : l.template run<true, false, false>();
    }
  } else {
    if (p.second_order) {
      p.clamp ? l.template run<false, true, true>() : l.template run<false, true, false>();
    } else {
      p.clamp ? l.template run<false, false, true>() : l.template run<false, false, false>();
    }
  }
}

}  // namespace

cudaError_t launch_dpmpp_step_f32(const float* x, const float* eps_cond, const float* eps_uncond, const float* x0_prev,
                                  float* x_next, float* x0, int64_t n, StepParams p, int device, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  dispatch_flags(p, Launch<float>{x, eps_cond, eps_uncond, x0_prev, x_next, x0, n, p, device, stream});
  return cudaGetLastError();
}

cudaError_t launch_dpmpp_step_f16(const void* x, const void* eps_cond, const void* eps_uncond, const void* x0_prev,
                                  void* x_next, void* x0, int64_t n, StepParams p, int device, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  using H = __half;
  dispatch_flags(p, Launch<H>{static_cast<const H*>(x), static_cast<const H*>(eps_cond),
                              static_cast<const H*>(eps_uncond), static_cast<const H*>(x0_prev), static_cast<H*>(x_next),
                              static_cast<H*>(x0), n, p, device, stream});
  return cudaGetLastError();
}

}  // namespace glyph_engine
