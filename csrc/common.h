// Shared helpers for the CPU kernels. Every op file includes this and registers its
// kernels with TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m); schemas are defined in Python
// (lvlm_fast/ops/<op>.py), so this library only provides implementations. Hot op files
// are compiled once per ISA and register a dispatching kernel (isa.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "isa.h"

#include <cmath>
#include <cstdint>
#include <limits>

namespace lvlm_fast {

// Accumulation type: fp32 for fp32/fp16/bf16 (the design's rule), fp64 for fp64 (gradcheck).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// fp32, fp64, fp16, bf16.
#define LVLM_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Kernels index rows through 64-bit strides; the last dim must be unit-stride. Tensors
// whose last dim is strided are copied once here (documented), never silently elsewhere.
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1) ? t : t.contiguous();
}

constexpr double kCosEps = 1e-8;

}  // namespace lvlm_fast
