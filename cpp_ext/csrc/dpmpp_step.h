// The fused DPM-Solver++ step: shared parameters of the CPU and CUDA implementations.
//
// Per element, in FP32 whatever the storage type:
//   eps    = guided ? eps_u + guidance * (eps_c - eps_u) : eps_c
//   x0     = x_scale * x - eps_scale * eps,  clamped to [clamp_min, clamp_max] if clamp
//            (NaN stays NaN, as in torch.clamp)
//   x_next = a * x + b * x0 (+ c * x0_prev when second order)
// One read of each input and one write of each output, where eager PyTorch makes about ten
// passes over the batch.
#pragma once

#include <cstdint>

namespace glyph_engine {

struct StepParams {
  float guidance;
  float x_scale;
  float eps_scale;
  float a;
  float b;
  float c;
  float clamp_min;
  float clamp_max;
  bool guided;      // eps_uncond given
  bool second_order;  // x0_prev given
  bool clamp;
};

}  // namespace glyph_engine
