// Which compile of the hot kernels runs (see isa.h): detection, selection and the small
// `lvlm_fast_isa` op library that lvlm_fast._extension uses to report and force it.
// Compiled once, with the default (baseline) flags.
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "isa.h"

namespace lvlm_fast {
namespace isa {
namespace {

#if defined(LVLM_ISA_MULTI)
#if defined(__aarch64__)
constexpr const char* kNames[kNumIsa] = {"neon", "avx2", "avx512"};
#else
constexpr const char* kNames[kNumIsa] = {"baseline", "avx2", "avx512"};
#endif
#else
// JIT build: one compile per file with -march=native.
constexpr const char* kNames[kNumIsa] = {"native", "avx2", "avx512"};
#endif

bool built(int i) {
  switch (i) {
    case kBaseline:
      return true;
#if defined(LVLM_ISA_BUILT_AVX2)
    case kAvx2:
      return true;
#endif
#if defined(LVLM_ISA_BUILT_AVX512)
    case kAvx512:
      return true;
#endif
    default:
      return false;
  }
}

// The CPU (and OS: libgcc's cpu model checks XCR0 for the YMM / ZMM state) can run variant i.
// The flags match setup.py's -m flags for that variant.
bool supported(int i) {
  if (i == kBaseline) return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (i == kAvx2) return avx2;
  if (i == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

int best() {
  for (int i = kNumIsa - 1; i > kBaseline; --i)
    if (built(i) && supported(i)) return i;
  return kBaseline;
}

std::atomic<int> g_active{-1};

int index_of(const std::string& name) {
  if (name == "baseline") return kBaseline;  // an alias of index 0 on every build
  for (int i = 0; i < kNumIsa; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

int current() {
  int a = g_active.load(std::memory_order_relaxed);
  if (a < 0) {
    int expected = -1;
    g_active.compare_exchange_strong(expected, best());
    a = g_active.load(std::memory_order_relaxed);
  }
  return a;
}

std::string cpu_isa() { return kNames[current()]; }

// Which compile of a hot kernel ran last ("" before any): for tests (isa.h: last_ran).
std::string cpu_isa_last_ran() {
  const int i = last_ran.load(std::memory_order_relaxed);
  return i < 0 ? std::string() : std::string(kNames[i]);
}

std::vector<std::string> names_where(bool (*pred)(int)) {
  std::vector<std::string> out;
  for (int i = 0; i < kNumIsa; ++i)
    if (built(i) && pred(i)) out.emplace_back(kNames[i]);
  return out;
}

std::vector<std::string> cpu_isa_built() {
  return names_where([](int) { return true; });
}
std::vector<std::string> cpu_isa_supported() {
  return names_where([](int i) { return supported(i); });
}

// "auto" = best(); anything else must be built and supported (running an AVX-512 compile
// on a CPU without it would die with SIGILL, so it is refused here, never attempted).
std::string set_cpu_isa(const std::string& name) {
  const std::string before = cpu_isa();
  const int i = name == "auto" ? best() : index_of(name);
  TORCH_CHECK_VALUE(i >= 0, "lvlm_fast: unknown CPU ISA '", name, "'; expected auto or one of ",
                    c10::Join(", ", cpu_isa_built()));
  TORCH_CHECK_VALUE(built(i), "lvlm_fast: CPU ISA '", name,
                    "' is not compiled into this build; built: ", c10::Join(", ", cpu_isa_built()));
  TORCH_CHECK_VALUE(supported(i), "lvlm_fast: this CPU cannot run the '", name,
                    "' kernels; supported: ", c10::Join(", ", cpu_isa_supported()));
  g_active.store(i, std::memory_order_relaxed);
  return before;
}

}  // namespace

#if defined(LVLM_ISA_MULTI)
int active() { return current(); }
#endif

}  // namespace isa
}  // namespace lvlm_fast

TORCH_LIBRARY(lvlm_fast_isa, m) {
  m.def("cpu_isa() -> str", &lvlm_fast::isa::cpu_isa);
  m.def("cpu_isa_built() -> str[]", &lvlm_fast::isa::cpu_isa_built);
  m.def("cpu_isa_supported() -> str[]", &lvlm_fast::isa::cpu_isa_supported);
  m.def("set_cpu_isa(str isa) -> str", &lvlm_fast::isa::set_cpu_isa);
  m.def("cpu_isa_last_ran() -> str", &lvlm_fast::isa::cpu_isa_last_ran);
}
