// Runtime ISA dispatch for the hot CPU kernels (the scheme PyTorch uses for its own kernels).
//
// A hot op file (one that ends with LVLM_ISA_EXPORT / LVLM_ISA_DISPATCH) is compiled more
// than once into the same extension: as itself with the compiler's default target (the
// baseline variant: x86-64 SSE2, or aarch64 with NEON, which ARMv8-A always has), and on
// x86-64 once more per wider ISA from a generated wrapper that #defines LVLM_ISA and
// includes the file, with that ISA's -m flags (setup.py: ISA_VARIANTS). Everything the file
// defines lives in `inline namespace LVLM_ISA`, so each compile has its own symbols
// (lvlm_fast::baseline::..., lvlm_fast::avx2::..., lvlm_fast::avx512::...), and only the
// baseline compile registers the op: its CPU kernel is a dispatcher that calls the variant
// chosen at load time (isa.cpp: best of built x supported by this CPU, or the one set by
// LVLM_FAST_CPU_ISA / lvlm_fast._extension.set_cpu_isa).
//
// Inline functions from headers (ATen, libstdc++) are emitted by every variant as COMDAT
// copies; the linker keeps the first, and setup.py links the baseline objects first, so a
// shared helper is never an AVX copy (tests/tier0/test_cpu_dispatch.py checks the .so).
//
// The JIT build (lvlm_fast._extension, LVLM_FAST_JIT=1) compiles each file once with
// -march=native and no variants: LVLM_ISA_MULTI is undefined and the dispatcher calls the
// single compile directly (reported as "native").
#pragma once

#include <atomic>
#include <utility>

#ifndef LVLM_ISA
#define LVLM_ISA baseline
#define LVLM_ISA_INDEX 0
#define LVLM_ISA_REGISTER 1  // the baseline compile registers the dispatching kernels
#else
#define LVLM_ISA_REGISTER 0  // a variant compile (setup.py also defines LVLM_ISA_INDEX)
#endif

namespace lvlm_fast {
namespace isa {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kNumIsa = 3 };

#if defined(LVLM_ISA_MULTI)
// The variant in use (isa.cpp: chosen once on first use, changeable by set_cpu_isa).
int active();
#else
inline int active() { return kBaseline; }
#endif

// The variant whose compile of a hot kernel ran last (its own LVLM_ISA_INDEX, stored by
// the variant's getter below): lets tests see which compile actually ran. -1: none yet.
inline std::atomic<int> last_ran{-1};

template <typename F>
struct Dispatch;

// call<B, V2, V5>: the CPU kernel registered for an op. B/V2/V5 return the baseline, AVX2
// and AVX-512 compiles of the same function (the baseline's where a variant is not built).
template <typename R, typename... A>
struct Dispatch<R (*)(A...)> {
  using Fn = R (*)(A...);
  template <Fn (*B)(), Fn (*V2)(), Fn (*V5)()>
  static R call(A... a) {
    switch (active()) {
      case kAvx512:
        return V5()(std::forward<A>(a)...);
      case kAvx2:
        return V2()(std::forward<A>(a)...);
      default:
        return B()(std::forward<A>(a)...);
    }
  }
};

}  // namespace isa
}  // namespace lvlm_fast

// In the op file, inside `namespace lvlm_fast { inline namespace LVLM_ISA {`: an externally
// visible getter `name_entry()` for this compile's `fn` (which may be in an anonymous
// namespace).
#define LVLM_ISA_EXPORT(name, fn)                                               \
  using name##_fn = decltype(&fn);                                              \
  name##_fn name##_entry() {                                                    \
    ::lvlm_fast::isa::last_ran.store(LVLM_ISA_INDEX, std::memory_order_relaxed); \
    return &fn;                                                                 \
  }

#if defined(LVLM_ISA_BUILT_AVX2)
#define LVLM_ISA_DECLARE_AVX2(name) \
  namespace lvlm_fast {             \
  namespace avx2 {                  \
  ::lvlm_fast::baseline::name##_fn name##_entry(); \
  }                                 \
  }
#define LVLM_ISA_ENTRY_AVX2(name) &::lvlm_fast::avx2::name##_entry
#else
#define LVLM_ISA_DECLARE_AVX2(name)
#define LVLM_ISA_ENTRY_AVX2(name) &::lvlm_fast::baseline::name##_entry
#endif

#if defined(LVLM_ISA_BUILT_AVX512)
#define LVLM_ISA_DECLARE_AVX512(name) \
  namespace lvlm_fast {               \
  namespace avx512 {                  \
  ::lvlm_fast::baseline::name##_fn name##_entry(); \
  }                                   \
  }
#define LVLM_ISA_ENTRY_AVX512(name) &::lvlm_fast::avx512::name##_entry
#else
#define LVLM_ISA_DECLARE_AVX512(name)
#define LVLM_ISA_ENTRY_AVX512(name) &::lvlm_fast::baseline::name##_entry
#endif

// At global scope in the baseline compile (#if LVLM_ISA_REGISTER), before TORCH_LIBRARY_IMPL.
#define LVLM_ISA_DECLARE(name) LVLM_ISA_DECLARE_AVX2(name) LVLM_ISA_DECLARE_AVX512(name)

// The dispatching kernel to pass to m.impl().
#define LVLM_ISA_DISPATCH(name)                                                   \
  (&::lvlm_fast::isa::Dispatch<::lvlm_fast::baseline::name##_fn>::call<           \
      &::lvlm_fast::baseline::name##_entry, LVLM_ISA_ENTRY_AVX2(name),            \
      LVLM_ISA_ENTRY_AVX512(name)>)
