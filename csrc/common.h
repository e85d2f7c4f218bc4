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

#include <algorithm>
#include <atomic>
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

// Dynamic scheduling for loops whose items (frames, chunks of frames) write disjoint
// outputs: one parallel region whose threads claim the next `grain` items from a shared
// counter until none are left. at::parallel_for splits statically, so on a shared machine
// the whole op waits for its slowest (descheduled or co-scheduled) thread's full half;
// here a thread that runs faster, or starts earlier, takes over the rest. Each item's
// result is computed the same way whichever thread claims it, so outputs do not depend on
// the schedule. `body(next)` runs once per thread (set up per-thread scratch there) and
// loops `while (next(b, e))` over [b, e) item ranges.
template <typename Body>
void parallel_dynamic(int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t pieces = (n + grain - 1) / grain;
  std::atomic<int64_t> counter{0};
  auto next = [&](int64_t& b, int64_t& e) {
    const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    if (i >= pieces) return false;
    b = i * grain;
    e = std::min(n, b + grain);
    return true;
  };
  const int64_t nt = std::min<int64_t>(std::max(1, at::get_num_threads()), pieces);
  if (nt <= 1 || at::in_parallel_region()) {
    body(next);
    return;
  }
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) { body(next); });
}

}  // namespace lvlm_fast
