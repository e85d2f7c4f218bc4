// ViLAMP differential feature merging, CPU kernels (spec: lvlm_fast/reference/diff_weighted_pool.py,
// schema / autograd / validation: lvlm_fast/ops/diff_weighted_pool.py).
//
//   s[n,p] = (cos(q[n], A[n,p]) - cos(R[ref[n],p], B[n,p])) / tau     (ref[n] = -1: no 2nd term)
//   w = softmax_p(s), out[n] = sum_p w[n,p] X[n,p], lse[n] = logsumexp_p s[n,:]
//
// Forward: parallel over chunks of up to kMaxChunk frames, taken in ref-sorted order so the
// frames of a chunk mostly share one reference row. Each frame keeps an online softmax
// (running max m, running sum l, accumulator of length D in acc_t, rescaled when m grows).
// Patches are visited in tiles of PT rows: the tile of R[ref] rows (and its norms, computed
// once per (chunk, tile, ref)) stays in L1/L2 while every frame of the chunk streams its
// own PT rows of X, so the bank costs ~1/chunk of X's traffic instead of a second X. Per
// row: ONE sweep computes every dot product and norm (q.x, r.x, x.x when A = B = X), then
// one accumulate sweep while the row is still in L1. X (and A, B) are read exactly once;
// nothing of size (N, P, D) is allocated. Weights are materialised only when requested
// (raw scores in an (N, P) buffer, normalised with lse at the end of the chunk).
//
// Backward: parallel over contiguous patch blocks (one block per thread). A block loops over
// its patch tiles, and for each tile over ALL frames in ref-sorted order, recomputing s from
// the same dot products and w = exp(s - lse). It owns grad_x / grad_rel / grad_red rows of
// its patches (written once) and grad_ref_bank[k, tile] (accumulated in a tile-sized acc_t
// buffer over the run of frames with ref = k, written once when the run ends): no atomics,
// no write conflicts. grad_query (per block: (Da) or (N, Da) partials) and grad_tau (per
// block, fp64) are reduced in block order at the end: deterministic for a given thread
// count. d cos(a,b)/da = b/(na nb) - cos a/na^2, the second term dropped when |a| <= eps;
// its two parts are accumulated separately (a vector sum of the other operand and a scalar
// that multiplies the own vector once at the end), so R's and q's gradients need one sweep.
//
// Accumulation: fp32 for fp32/fp16/bf16 (fp16/bf16 rows are converted to fp32 once per row,
// in L1), fp64 for fp64. NaN anywhere in a frame's inputs makes that frame's out/lse NaN and
// no other frame's (a NaN bank row reaches only the frames that reference it).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define LVLM_DWP_F16C 1
#endif

namespace lvlm_fast {
inline namespace LVLM_ISA {  // compiled once per ISA variant (isa.h)
namespace dwp {
namespace {

constexpr int64_t kMaxChunk = 16;        // frames per forward chunk (bank-row reuse factor)
constexpr int64_t kTileBytes = 32 * 1024;  // bytes of bank rows kept hot per patch tile
constexpr int64_t kMaxTile = 16;

// ------------------------------------------------------------------ row conversion
inline void to_acc(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

inline void to_acc(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef LVLM_DWP_F16C
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void from_acc(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    // round to nearest even; NaN stays a (quiet) NaN
    uint32_t r = ((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    d[i] = static_cast<uint16_t>(r);
  }
}

inline void from_acc(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef LVLM_DWP_F16C
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// A row as acc_t: the input itself when T == S (no copy), else converted into buf.
template <typename T, typename S>
inline const S* load(const T* src, S* buf, int64_t n) {
  if constexpr (std::is_same_v<T, S>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    to_acc(src, buf, n);
    return buf;
  }
}
// Where to compute an output row: in place when T == S, else in buf (then commit()).
template <typename T, typename S>
inline S* out_ptr(T* dst, S* buf) {
  if constexpr (std::is_same_v<T, S>) {
    (void)buf;
    return dst;
  } else {
    return buf;
  }
}
template <typename T, typename S>
inline void commit(const S* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, S>) from_acc(buf, dst, n);
}

// ------------------------------------------------------------------ one-sweep reductions
// Each sum is kept in kLanes<S> partial lanes (two AVX2 registers) so consecutive FMAs into
// the same sum are independent: a single-register `omp simd reduction` is bound by the FMA
// latency (measured 0.45 vs 0.31 cycles/element for dot2_sq on Zen 3).
// AVX-512 compile: two registers per sum (one 512-bit register per sum left the sweep bound
// by the FMA latency: 4 cycles per 16 elements for 3 chains, vs 3 for the loads).
#if defined(__AVX512F__)
template <typename S>
constexpr int64_t kLanes = 128 / sizeof(S);
#else
template <typename S>
constexpr int64_t kLanes = 64 / sizeof(S);
#endif

#define LVLM_DWP_REDUCE(NSUM, INIT_BODY, LANE_BODY, TAIL_BODY)  \
  constexpr int64_t L = kLanes<S>;                              \
  const int64_t nv = n - n % L;                                 \
  for (int64_t i0 = 0; i0 < nv; i0 += L) {                      \
    _Pragma("omp simd") for (int64_t j = 0; j < L; ++j) {       \
      const int64_t i = i0 + j;                                 \
      LANE_BODY                                                 \
    }                                                           \
  }                                                             \
  for (int64_t j = 0; j < L; ++j) { INIT_BODY }                 \
  for (int64_t i = nv; i < n; ++i) { TAIL_BODY }

template <typename S>
inline S sumsq(const S* __restrict v, int64_t n) {
  S p0[kLanes<S>] = {};
  S vv = 0;
  LVLM_DWP_REDUCE(1, vv += p0[j];, p0[j] += v[i] * v[i];, vv += v[i] * v[i];)
  return vv;
}
template <typename S>
inline S dot(const S* __restrict u, const S* __restrict v, int64_t n) {
  S p0[kLanes<S>] = {};
  S uv = 0;
  LVLM_DWP_REDUCE(1, uv += p0[j];, p0[j] += u[i] * v[i];, uv += u[i] * v[i];)
  return uv;
}
// u.v, v.v
template <typename S>
inline void dot_sq(const S* __restrict u, const S* __restrict v, int64_t n, S& uv, S& vv) {
  S p0[kLanes<S>] = {}, p1[kLanes<S>] = {};
  S a = 0, b = 0;
  LVLM_DWP_REDUCE(2, a += p0[j]; b += p1[j];, const S x = v[i]; p0[j] += u[i] * x; p1[j] += x * x;,
                  const S x = v[i]; a += u[i] * x; b += x * x;)
  uv = a;
  vv = b;
}
// u.v, r.v, v.v
template <typename S>
inline void dot2_sq(const S* __restrict u, const S* __restrict r, const S* __restrict v, int64_t n,
                    S& uv, S& rv, S& vv) {
  S p0[kLanes<S>] = {}, p1[kLanes<S>] = {}, p2[kLanes<S>] = {};
  S a = 0, b = 0, c = 0;
  LVLM_DWP_REDUCE(3, a += p0[j]; b += p1[j]; c += p2[j];,
                  const S x = v[i]; p0[j] += u[i] * x; p1[j] += r[i] * x; p2[j] += x * x;,
                  const S x = v[i]; a += u[i] * x; b += r[i] * x; c += x * x;)
  uv = a;
  rv = b;
  vv = c;
}
// u.v, r.v, g.v, v.v
template <typename S>
inline void dot3_sq(const S* __restrict u, const S* __restrict r, const S* __restrict g,
                    const S* __restrict v, int64_t n, S& uv, S& rv, S& gv, S& vv) {
  S p0[kLanes<S>] = {}, p1[kLanes<S>] = {}, p2[kLanes<S>] = {}, p3[kLanes<S>] = {};
  S a = 0, b = 0, c = 0, d = 0;
  LVLM_DWP_REDUCE(4, a += p0[j]; b += p1[j]; c += p2[j]; d += p3[j];,
                  const S x = v[i]; p0[j] += u[i] * x; p1[j] += r[i] * x; p2[j] += g[i] * x;
                  p3[j] += x * x;,
                  const S x = v[i]; a += u[i] * x; b += r[i] * x; c += g[i] * x; d += x * x;)
  uv = a;
  rv = b;
  gv = c;
  vv = d;
}
#undef LVLM_DWP_REDUCE

template <typename S>
inline S clamp_norm(S sq) {
  // std::max keeps a NaN first argument, so NaN propagates like the reference's clamp_min.
  return std::max(std::sqrt(sq), static_cast<S>(kCosEps));
}
template <typename S>
inline bool above_eps(S sq) {
  return std::sqrt(sq) > static_cast<S>(kCosEps);
}

// ------------------------------------------------------------------ backward row writers
// o = w g + c1 u - c2 v ; acc += c1 v
template <typename S>
inline void write3(S* __restrict o, S w, const S* __restrict g, S c1, const S* __restrict u, S c2,
                   const S* __restrict v, S* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    o[i] = w * g[i] + c1 * u[i] - c2 * v[i];
    acc[i] += c1 * v[i];
  }
}
// o = w g + cq q + cr r - cx x ; accq += cq x ; accr += cr x
template <typename S>
inline void write4(S* __restrict o, S w, const S* __restrict g, S cq, const S* __restrict q, S cr,
                   const S* __restrict r, S cx, const S* __restrict x, S* __restrict accq,
                   S* __restrict accr, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const S xi = x[i];
    o[i] = w * g[i] + cq * q[i] + cr * r[i] - cx * xi;
    accq[i] += cq * xi;
    accr[i] += cr * xi;
  }
}
// o = c1 u - c2 v ; acc += c1 v
template <typename S>
inline void write2(S* __restrict o, S c1, const S* __restrict u, S c2, const S* __restrict v,
                   S* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    o[i] = c1 * u[i] - c2 * v[i];
    acc[i] += c1 * v[i];
  }
}
template <typename S>
inline void scale(S* __restrict o, S w, const S* __restrict g, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = w * g[i];
}

// Gradient outputs of X's size come fresh from mmap; on this kind of VM the 4 KB first-touch
// page faults cost more than streaming X itself (measured: 430 MB alloc + fill 230 ms vs a
// 45 ms refill). Ask for transparent huge pages on the 2 MB-aligned interior before the
// first write (a hint on memory the tensor owns; a no-op where THP is off).
at::Tensor empty_big(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t nbytes = uintptr_t(t.numel()) * t.element_size();
  if (nbytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + nbytes) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// ------------------------------------------------------------------ shared setup
struct Setup {
  int64_t N = 0, P = 0, D = 0, Da = 0, Db = 0, K = 0, Nq = 1;
  bool a_is_x = true, b_is_x = true, has_ref = false;
  at::Tensor x, a, b, bank;  // x.dtype, unit last stride (a/b/bank undefined when absent)
  at::Tensor q;              // (Nq, Da) in acc dtype, contiguous
  at::Tensor ref;            // (N,) int64 contiguous (undefined without bank)
  std::vector<int64_t> order;  // frames sorted by ref (stable; -1 first)
  double tau = 1.0;
};

const char* kName = "diff_weighted_pool";

void check_float(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kName, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kName, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
}

Setup prepare(const at::Tensor& x, const at::Tensor& query, const std::optional<at::Tensor>& ref_bank,
              const std::optional<at::Tensor>& ref_index, const std::optional<at::Tensor>& rel,
              const std::optional<at::Tensor>& red, const at::Tensor& tau) {
  Setup st;
  TORCH_CHECK_VALUE(x.device().is_cpu(), kName, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3, kName, ": x must be 3-D (N, P, D), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, kName,
              ": x must be float16, bfloat16, float32 or float64, got ", dt);
  st.N = x.size(0);
  st.P = x.size(1);
  st.D = x.size(2);
  TORCH_CHECK_VALUE(st.N >= 1 && st.P >= 1 && st.D >= 1, kName, ": x must have N, P, D >= 1, got ", x.sizes());
  st.x = unit_last_stride(x);

  // A given (even if it aliases x) gets its own gradient output, as the fake kernel says;
  // the Python wrapper maps rel=x to None so the common case reads x once.
  st.a_is_x = !rel.has_value();
  if (!st.a_is_x) {
    const auto& a = *rel;
    check_float(a, "rel", x);
    TORCH_CHECK_VALUE(a.dim() == 3 && a.size(0) == st.N && a.size(1) == st.P && a.size(2) >= 1, kName,
                ": rel must be (N=", st.N, ", P=", st.P, ", Da), got ", a.sizes());
    st.a = unit_last_stride(a);
  }
  st.Da = st.a_is_x ? st.D : st.a.size(2);

  check_float(query, "query", x);
  TORCH_CHECK_VALUE(query.dim() == 1 || query.dim() == 2, kName, ": query must be (Da,), (1, Da) or (N, Da), got ",
              query.sizes());
  TORCH_CHECK_VALUE(query.size(-1) == st.Da, kName, ": query.shape[-1] must equal the channel dim of rel (or x) (",
              st.Da, "), got ", query.sizes());
  st.Nq = query.dim() == 1 ? 1 : query.size(0);
  TORCH_CHECK_VALUE(st.Nq == 1 || st.Nq == st.N, kName, ": query must be (Da,), (1, Da) or (N=", st.N,
              ", Da), got ", query.sizes());
  const auto acc_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  st.q = query.reshape({st.Nq, st.Da}).to(acc_dtype).contiguous();

  TORCH_CHECK_VALUE(ref_bank.has_value() == ref_index.has_value(), kName,
              ": ref_bank and ref_index must be given together (or both None)");
  st.has_ref = ref_bank.has_value();
  if (st.has_ref) {
    st.b_is_x = !red.has_value();
    if (!st.b_is_x) {
      const auto& b = *red;
      check_float(b, "red", x);
      TORCH_CHECK_VALUE(b.dim() == 3 && b.size(0) == st.N && b.size(1) == st.P && b.size(2) >= 1, kName,
                  ": red must be (N=", st.N, ", P=", st.P, ", Db), got ", b.sizes());
      st.b = unit_last_stride(b);
    }
    st.Db = st.b_is_x ? st.D : st.b.size(2);
    const auto& r = *ref_bank;
    check_float(r, "ref_bank", x);
    TORCH_CHECK_VALUE(r.dim() == 3 && r.size(0) >= 1 && r.size(1) == st.P && r.size(2) == st.Db, kName,
                ": ref_bank must be (K>=1, P=", st.P, ", Db=", st.Db, "), got ", r.sizes());
    st.K = r.size(0);
    st.bank = unit_last_stride(r);
    const auto& ri = *ref_index;
    TORCH_CHECK_VALUE(ri.device().is_cpu(), kName, ": ref_index must be a CPU tensor, got ", ri.device());
    TORCH_CHECK_TYPE(ri.scalar_type() == at::kInt || ri.scalar_type() == at::kLong, kName,
                ": ref_index must be int32 or int64, got ", ri.scalar_type());
    TORCH_CHECK_VALUE(ri.dim() == 1 && ri.size(0) == st.N, kName, ": ref_index must be (N=", st.N, ",), got ",
                ri.sizes());
    st.ref = ri.to(at::kLong).contiguous();
    // Range check + stable counting sort by ref (O(N + K)).
    const int64_t* rp = st.ref.data_ptr<int64_t>();
    std::vector<int64_t> count(st.K + 2, 0);
    for (int64_t n = 0; n < st.N; ++n) {
      TORCH_CHECK_VALUE(rp[n] >= -1 && rp[n] < st.K, kName, ": ref_index values must be in [-1, ", st.K,
                  ") (K = ref_bank.shape[0]); ref_index[", n, "] = ", rp[n]);
      ++count[rp[n] + 2];
    }
    for (int64_t k = 1; k < st.K + 2; ++k) count[k] += count[k - 1];
    st.order.resize(st.N);
    for (int64_t n = 0; n < st.N; ++n) st.order[count[rp[n] + 1]++] = n;
  } else {
    // red without ref_bank is never read (the redundancy term is absent); its grad is zero.
    st.order.resize(st.N);
    for (int64_t n = 0; n < st.N; ++n) st.order[n] = n;
  }

  TORCH_CHECK_VALUE(tau.device().is_cpu(), kName, ": tau must be a CPU tensor, got ", tau.device());
  TORCH_CHECK_VALUE(tau.dim() == 0 && tau.is_floating_point(), kName, ": tau must be a 0-d float tensor, got ",
              tau.sizes(), " ", tau.scalar_type());
  st.tau = tau.item<double>();
  TORCH_CHECK_VALUE(st.tau > 0, kName, ": tau must be > 0, got ", st.tau);
  return st;
}

inline void prefetch_bytes(const void* ptr, int64_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

int64_t tile_rows(int64_t row_elems, int64_t elem_size) {
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(1, row_elems * elem_size), 1, kMaxTile);
}

// Strided 3-D row accessor (last dim unit stride).
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  const T* operator()(int64_t i, int64_t j) const { return p + i * s0 + j * s1; }
};

// ------------------------------------------------------------------ forward
template <typename T>
void forward_kernel(const Setup& st, at::Tensor& out, at::Tensor& weights, at::Tensor& lse,
                    bool return_weights) {
  using S = acc_t<T>;
  const int64_t N = st.N, P = st.P, D = st.D, Da = st.Da, Db = st.Db, Nq = st.Nq;
  const bool ax = st.a_is_x, bx = st.b_is_x, has_ref = st.has_ref;
  const Rows<T> X(st.x);
  const Rows<T> A = ax ? X : Rows<T>(st.a);
  const Rows<T> B = (!has_ref || bx) ? X : Rows<T>(st.b);
  const Rows<T> R = has_ref ? Rows<T>(st.bank) : Rows<T>();
  const int64_t* refp = has_ref ? st.ref.data_ptr<int64_t>() : nullptr;
  const int64_t* ord = st.order.data();
  const S* qp = st.q.data_ptr<S>();
  const S itau = static_cast<S>(1.0 / st.tau);

  std::vector<S> qn(Nq);
  for (int64_t i = 0; i < Nq; ++i) qn[i] = clamp_norm(sumsq(qp + i * Da, Da));

  T* outp = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  // Raw scores for the weights output: written in place into weights when T == S.
  at::Tensor score_buf;
  S* scores = nullptr;
  if (return_weights) {
    if constexpr (std::is_same_v<T, S>) {
      scores = weights.data_ptr<T>();
    } else {
      score_buf = at::empty({N, P}, st.q.options());
      scores = score_buf.template data_ptr<S>();
    }
  }

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t F = std::clamp<int64_t>((N + nthreads - 1) / nthreads, 1, kMaxChunk);
  const int64_t nchunks = (N + F - 1) / F;
  const int64_t PT = has_ref ? tile_rows(Db, sizeof(T)) : tile_rows(D, sizeof(T));

  // Chunks are claimed dynamically (common.h: parallel_dynamic); each writes only its own
  // frames' out/lse/weights rows.
  parallel_dynamic(nchunks, 1, [&](auto& next) {
    std::vector<S> acc(F * D), m(F), l(F), rn(PT), obuf(D);
    std::vector<S> xbuf, abuf, bbuf, rbuf;
    if constexpr (!std::is_same_v<T, S>) {
      xbuf.resize(D);
      abuf.resize(Da);
      bbuf.resize(Db);
      rbuf.resize(PT * Db);
    }
    std::vector<const S*> rrow(PT, nullptr);
    for (int64_t c0, c1; next(c0, c1);)
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t f0 = c * F, nf = std::min(F, N - f0);
      const int64_t* fr = ord + f0;
      std::fill(m.begin(), m.end(), -std::numeric_limits<S>::infinity());
      std::fill(l.begin(), l.end(), S(0));
      std::fill(acc.begin(), acc.begin() + nf * D, S(0));
      for (int64_t p0 = 0; p0 < P; p0 += PT) {
        const int64_t pt_n = std::min(PT, P - p0);
        int64_t cur_k = -1;
        for (int64_t j = 0; j < nf; ++j) {
          const int64_t n = fr[j];
          const int64_t k = has_ref ? refp[n] : -1;
          if (k >= 0 && k != cur_k) {  // new reference: its tile rows and norms, once
            cur_k = k;
            for (int64_t t = 0; t < pt_n; ++t) {
              rrow[t] = load<T, S>(R(k, p0 + t), rbuf.data() + t * Db, Db);
              rn[t] = clamp_norm(sumsq(rrow[t], Db));
            }
          }
          const S* qrow = qp + (Nq == 1 ? 0 : n) * Da;
          const S nq = qn[Nq == 1 ? 0 : n];
          S* accj = acc.data() + j * D;
          S& mj = m[j];
          S& lj = l[j];
          for (int64_t t = 0; t < pt_n; ++t) {
            const int64_t p = p0 + t;
            // Software prefetch of the X row visited PT rows from now (row t of the chunk's
            // next frame, or of the first frame's next tile): the walk hops between the
            // chunk's frames every tile (~32 KB), where the hardware stream prefetchers
            // restart, so each row is requested one tile ahead of its use.
            if (j + 1 < nf) {
              prefetch_bytes(X(fr[j + 1], p), D * static_cast<int64_t>(sizeof(T)));
            } else if (p0 + PT + t < P) {
              prefetch_bytes(X(fr[0], p0 + PT + t), D * static_cast<int64_t>(sizeof(T)));
            }
            const S* xr = load<T, S>(X(n, p), xbuf.data(), D);
            S c1, c2 = 0;
            if (ax && bx) {
              if (k >= 0) {
                S qx, rx, xx;
                dot2_sq(qrow, rrow[t], xr, D, qx, rx, xx);
                const S nx = clamp_norm(xx);
                c1 = qx / (nq * nx);
                c2 = rx / (rn[t] * nx);
              } else {
                S qx, xx;
                dot_sq(qrow, xr, D, qx, xx);
                c1 = qx / (nq * clamp_norm(xx));
              }
            } else {
              const S* ar = ax ? xr : load<T, S>(A(n, p), abuf.data(), Da);
              S qa, aa;
              dot_sq(qrow, ar, Da, qa, aa);
              c1 = qa / (nq * clamp_norm(aa));
              if (k >= 0) {
                const S* br = bx ? xr : load<T, S>(B(n, p), bbuf.data(), Db);
                S rb, bb;
                dot_sq(rrow[t], br, Db, rb, bb);
                c2 = rb / (rn[t] * clamp_norm(bb));
              }
            }
            const S s = (c1 - c2) * itau;
            if (scores) scores[n * P + p] = s;
            // Online softmax; a NaN score fails s > mj and poisons l and acc of this frame only.
            if (s > mj) {
              const S alpha = std::exp(mj - s);
              mj = s;
              lj = lj * alpha + S(1);
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) accj[d] = accj[d] * alpha + xr[d];
            } else {
              const S e = std::exp(s - mj);
              lj += e;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) accj[d] += e * xr[d];
            }
          }
        }
      }
      for (int64_t j = 0; j < nf; ++j) {
        const int64_t n = fr[j];
        const S lse_n = m[j] + std::log(l[j]);
        lsep[n] = static_cast<float>(lse_n);
        const S inv = S(1) / l[j];
        T* orow = outp + n * D;
        S* o = out_ptr<T, S>(orow, obuf.data());
        const S* accj = acc.data() + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = accj[d] * inv;
        commit<T, S>(o, orow, D);
        if (scores) {
          S* sr = scores + n * P;
          for (int64_t p = 0; p < P; ++p) sr[p] = std::exp(sr[p] - lse_n);
          if constexpr (!std::is_same_v<T, S>) from_acc(sr, weights.data_ptr<T>() + n * P, P);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwp_forward(
    const at::Tensor& x, const at::Tensor& query, const std::optional<at::Tensor>& ref_bank,
    const std::optional<at::Tensor>& ref_index, const std::optional<at::Tensor>& rel,
    const std::optional<at::Tensor>& red, const at::Tensor& tau, bool return_weights) {
  Setup st = prepare(x, query, ref_bank, ref_index, rel, red, tau);
  at::Tensor out = at::empty({st.N, st.D}, x.options());
  at::Tensor weights = return_weights ? at::empty({st.N, st.P}, x.options()) : at::empty({0}, x.options());
  at::Tensor lse = at::empty({st.N}, x.options().dtype(at::kFloat));
  LVLM_DISPATCH_FLOATS(x.scalar_type(), "diff_weighted_pool_cpu", [&] {
    forward_kernel<scalar_t>(st, out, weights, lse, return_weights);
  });
  return {out, weights, lse};
}

// ------------------------------------------------------------------ backward
template <typename T>
void backward_kernel(const Setup& st, const at::Tensor& g_t, const at::Tensor& out_t, const at::Tensor& lse_t,
                     at::Tensor& gx_t, at::Tensor& grel_t, at::Tensor& gred_t, at::Tensor& gbank_t,
                     at::Tensor& gq_part_t, at::Tensor& gq_scal_t, std::vector<double>& dtau_part) {
  using S = acc_t<T>;
  const int64_t N = st.N, P = st.P, D = st.D, Da = st.Da, Db = st.Db, Nq = st.Nq;
  const bool ax = st.a_is_x, bx = st.b_is_x, has_ref = st.has_ref;
  const bool rel_out = !ax, red_out = has_ref && !bx;
  const Rows<T> X(st.x);
  const Rows<T> A = ax ? X : Rows<T>(st.a);
  const Rows<T> B = (!has_ref || bx) ? X : Rows<T>(st.b);
  const Rows<T> R = has_ref ? Rows<T>(st.bank) : Rows<T>();
  const int64_t* refp = has_ref ? st.ref.data_ptr<int64_t>() : nullptr;
  const int64_t* ord = st.order.data();
  const S* qp = st.q.data_ptr<S>();
  const S* gp = g_t.data_ptr<S>();   // (N, D) acc dtype, contiguous
  const S* op = out_t.data_ptr<S>();  // (N, D) acc dtype, contiguous
  const S* lsep = lse_t.data_ptr<S>();
  const S itau = static_cast<S>(1.0 / st.tau);

  std::vector<S> qn(Nq);
  std::vector<char> qbig(Nq);
  for (int64_t i = 0; i < Nq; ++i) {
    const S sq = sumsq(qp + i * Da, Da);
    qn[i] = clamp_norm(sq);
    qbig[i] = above_eps(sq);
  }
  // delta[n] = g[n] . out[n]  (= sum_p w g.X, the softmax-backward shift)
  std::vector<S> delta(N);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) delta[n] = dot(gp + n * D, op + n * D, D);
  });

  T* gx = gx_t.data_ptr<T>();  // contiguous (N, P, D)
  T* grel = rel_out ? grel_t.data_ptr<T>() : nullptr;
  T* gred = red_out ? gred_t.data_ptr<T>() : nullptr;
  T* gbank = has_ref ? gbank_t.data_ptr<T>() : nullptr;  // contiguous (K, P, Db), zeroed
  S* gq_part = gq_part_t.data_ptr<S>();                   // (nb, Nq, Da), zeroed
  S* gq_scal = gq_scal_t.data_ptr<S>();                   // (nb, Nq), zeroed
  const int64_t nb = static_cast<int64_t>(dtau_part.size());
  const int64_t PT = tile_rows(std::max(D, Db), sizeof(T));

  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<S> rn(PT), gr_acc(PT * Db), gr_scal(PT), obuf(std::max({D, Da, Db}));
    std::vector<char> rbig(PT);
    std::vector<S> xbuf, abuf, bbuf, rbuf;
    if constexpr (!std::is_same_v<T, S>) {
      xbuf.resize(D);
      abuf.resize(Da);
      bbuf.resize(Db);
      rbuf.resize(PT * Db);
    }
    std::vector<const S*> rrow(PT, nullptr);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t pb = blk * P / nb, pe = (blk + 1) * P / nb;
      S* gqv_base = gq_part + blk * Nq * Da;
      S* gqs_base = gq_scal + blk * Nq;
      double dtau = 0.0;
      for (int64_t p0 = pb; p0 < pe; p0 += PT) {
        const int64_t pt_n = std::min(PT, pe - p0);
        int64_t cur_k = -1;
        // grad_ref_bank[k, tile] = sum_n (dc2/(nr nb)) B[n,p] - R[k,p] * sum_n dc2 cos2 / nr^2
        auto flush = [&]() {
          if (cur_k < 0) return;
          for (int64_t t = 0; t < pt_n; ++t) {
            T* dst = gbank + (cur_k * P + p0 + t) * Db;
            S* o = out_ptr<T, S>(dst, obuf.data());
            const S* v = gr_acc.data() + t * Db;
            const S* r = rrow[t];
            const S sc = gr_scal[t];
#pragma omp simd
            for (int64_t i = 0; i < Db; ++i) o[i] = v[i] - sc * r[i];
            commit<T, S>(o, dst, Db);
          }
        };
        for (int64_t idx = 0; idx < N; ++idx) {
          const int64_t n = ord[idx];
          const int64_t k = has_ref ? refp[n] : -1;
          if (k != cur_k) {  // frames are ref-sorted: each (k, tile) is one run, flushed once
            flush();
            cur_k = k;
            if (k >= 0) {
              for (int64_t t = 0; t < pt_n; ++t) {
                rrow[t] = load<T, S>(R(k, p0 + t), rbuf.data() + t * Db, Db);
                const S sq = sumsq(rrow[t], Db);
                rn[t] = clamp_norm(sq);
                rbig[t] = above_eps(sq);
              }
              std::fill(gr_acc.begin(), gr_acc.begin() + pt_n * Db, S(0));
              std::fill(gr_scal.begin(), gr_scal.begin() + pt_n, S(0));
            }
          }
          const int64_t qi = Nq == 1 ? 0 : n;
          const S* qrow = qp + qi * Da;
          const S nq = qn[qi];
          const bool qb = qbig[qi];
          S* gqv = gqv_base + qi * Da;
          S gqs = 0;
          const S* grow = gp + n * D;
          const S dl = delta[n], ln = lsep[n];
          for (int64_t t = 0; t < pt_n; ++t) {
            const int64_t p = p0 + t;
            const S* xr = load<T, S>(X(n, p), xbuf.data(), D);
            const S* ar = ax ? xr : load<T, S>(A(n, p), abuf.data(), Da);
            const S* br = (k < 0 || bx) ? xr : load<T, S>(B(n, p), bbuf.data(), Db);
            S qa, aa, rb = 0, bb = 0, gx_dot;
            if (ax && bx && k >= 0) {
              dot3_sq(qrow, rrow[t], grow, xr, D, qa, rb, gx_dot, aa);
              bb = aa;
            } else if (ax) {
              dot2_sq(qrow, grow, xr, D, qa, gx_dot, aa);
              if (k >= 0) dot_sq(rrow[t], br, Db, rb, bb);
            } else {
              dot_sq(qrow, ar, Da, qa, aa);
              if (k >= 0 && bx) {
                dot2_sq(rrow[t], grow, xr, D, rb, gx_dot, bb);
              } else {
                if (k >= 0) dot_sq(rrow[t], br, Db, rb, bb);
                gx_dot = dot(grow, xr, D);
              }
            }
            const S na = clamp_norm(aa);
            const S c1 = qa / (nq * na);
            S nbn = 1, c2 = 0;
            if (k >= 0) {
              nbn = clamp_norm(bb);
              c2 = rb / (rn[t] * nbn);
            }
            const S s = (c1 - c2) * itau;
            const S w = std::exp(s - ln);
            const S ds = w * (gx_dot - dl);
            const S dc1 = ds * itau;
            dtau -= static_cast<double>(ds) * static_cast<double>(s) * static_cast<double>(itau);
            // d/dA: dc1 (q/(na nq) - cos1 A/na^2);  d/dq: dc1 (A/(na nq) - cos1 q/nq^2)
            const S cq = dc1 / (na * nq);
            const S ca = above_eps(aa) ? dc1 * c1 / (na * na) : S(0);
            if (qb) gqs += dc1 * c1 / (nq * nq);
            S cr = 0, cb = 0;
            if (k >= 0) {
              const S dc2 = -dc1;
              cr = dc2 / (rn[t] * nbn);
              cb = above_eps(bb) ? dc2 * c2 / (nbn * nbn) : S(0);
              if (rbig[t]) gr_scal[t] += dc2 * c2 / (rn[t] * rn[t]);
            }
            S* gra = gr_acc.data() + t * Db;
            T* gx_row = gx + (n * P + p) * D;
            S* o = out_ptr<T, S>(gx_row, obuf.data());
            if (ax && bx && k >= 0) {
              write4(o, w, grow, cq, qrow, cr, rrow[t], ca + cb, xr, gqv, gra, D);
            } else if (ax) {
              write3(o, w, grow, cq, qrow, ca, xr, gqv, D);
            } else if (bx && k >= 0) {
              write3(o, w, grow, cr, rrow[t], cb, xr, gra, D);
            } else {
              scale(o, w, grow, D);
            }
            commit<T, S>(o, gx_row, D);
            if (rel_out) {
              T* dst = grel + (n * P + p) * Da;
              S* oa = out_ptr<T, S>(dst, obuf.data());
              write2(oa, cq, qrow, ca, ar, gqv, Da);
              commit<T, S>(oa, dst, Da);
            }
            if (red_out) {
              T* dst = gred + (n * P + p) * Db;
              S* ob = out_ptr<T, S>(dst, obuf.data());
              if (k >= 0) {
                write2(ob, cr, rrow[t], cb, br, gra, Db);
              } else {
                std::fill(ob, ob + Db, S(0));
              }
              commit<T, S>(ob, dst, Db);
            }
          }
          gqs_base[qi] += gqs;
        }
        flush();
      }
      dtau_part[blk] = dtau;
    }
  });
}

// grad_query = sum_blocks (vector part) - q * sum_blocks (scalar part), in block order.
template <typename S>
void reduce_query(const Setup& st, const at::Tensor& gq_part, const at::Tensor& gq_scal, at::Tensor& gq,
                  int64_t nb) {
  const S* part = gq_part.data_ptr<S>();
  const S* scal = gq_scal.data_ptr<S>();
  const S* q = st.q.data_ptr<S>();
  S* dst = gq.data_ptr<S>();
  const int64_t Nq = st.Nq, Da = st.Da;
  at::parallel_for(0, Nq, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      S sc = 0;
      for (int64_t b = 0; b < nb; ++b) sc += scal[b * Nq + i];
      S* d = dst + i * Da;
      const S* qi = q + i * Da;
#pragma omp simd
      for (int64_t c = 0; c < Da; ++c) d[c] = -sc * qi[c];
      for (int64_t b = 0; b < nb; ++b) {
        const S* v = part + (b * Nq + i) * Da;
#pragma omp simd
        for (int64_t c = 0; c < Da; ++c) d[c] += v[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& query,
    const std::optional<at::Tensor>& ref_bank, const std::optional<at::Tensor>& ref_index,
    const std::optional<at::Tensor>& rel, const std::optional<at::Tensor>& red, const at::Tensor& tau,
    const at::Tensor& out, const at::Tensor& lse) {
  Setup st = prepare(x, query, ref_bank, ref_index, rel, red, tau);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(), kName,
              "_backward: grad_out, out and lse must be CPU tensors");
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == st.N && grad_out.size(1) == st.D, kName,
              "_backward: grad_out must be (N=", st.N, ", D=", st.D, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == st.N && out.size(1) == st.D, kName,
              "_backward: out must be (N=", st.N, ", D=", st.D, "), got ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == st.N && lse.is_floating_point(), kName,
              "_backward: lse must be a float (N=", st.N, ",) tensor, got ", lse.sizes());
  // (N, D) / (N,) side inputs in the accumulation dtype: 1/P of X's size, copied once.
  const at::Tensor g = grad_out.to(acc_dtype).contiguous();
  const at::Tensor o = out.to(acc_dtype).contiguous();
  const at::Tensor l = lse.to(acc_dtype).contiguous();

  const auto opts = x.options();
  at::Tensor gx = empty_big({st.N, st.P, st.D}, opts);
  at::Tensor grel = st.a_is_x ? at::empty({0}, opts) : empty_big({st.N, st.P, st.Da}, opts);
  at::Tensor gred;
  if (st.has_ref && !st.b_is_x) {
    gred = empty_big({st.N, st.P, st.Db}, opts);
  } else if (red.has_value()) {
    gred = at::zeros(red->sizes(), opts);  // red without ref_bank: never read
  } else {
    gred = at::empty({0}, opts);
  }
  // Every referenced (k, p) row is written exactly once by a flush; only rows no frame
  // references are zeroed here (no zero-then-overwrite pass over the whole bank).
  at::Tensor gbank = st.has_ref ? empty_big({st.K, st.P, st.Db}, opts) : at::empty({0}, opts);
  if (st.has_ref) {
    std::vector<char> used(st.K, 0);
    const int64_t* rp = st.ref.data_ptr<int64_t>();
    for (int64_t n = 0; n < st.N; ++n) {
      if (rp[n] >= 0) used[rp[n]] = 1;
    }
    for (int64_t k = 0; k < st.K; ++k) {
      if (!used[k]) gbank.select(0, k).zero_();
    }
  }
  const int64_t nb = std::clamp<int64_t>(at::get_num_threads(), 1, st.P);
  at::Tensor gq_part = at::zeros({nb, st.Nq, st.Da}, opts.dtype(acc_dtype));
  at::Tensor gq_scal = at::zeros({nb, st.Nq}, opts.dtype(acc_dtype));
  std::vector<double> dtau_part(nb, 0.0);

  LVLM_DISPATCH_FLOATS(x.scalar_type(), "diff_weighted_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(st, g, o, l, gx, grel, gred, gbank, gq_part, gq_scal, dtau_part);
  });

  at::Tensor gq = at::empty({st.Nq, st.Da}, opts.dtype(acc_dtype));
  if (acc_dtype == at::kDouble) {
    reduce_query<double>(st, gq_part, gq_scal, gq, nb);
  } else {
    reduce_query<float>(st, gq_part, gq_scal, gq, nb);
  }
  at::Tensor grad_query = gq.to(query.scalar_type()).reshape(query.sizes()).contiguous();
  double dtau = 0.0;
  for (double v : dtau_part) dtau += v;
  at::Tensor grad_tau = at::scalar_tensor(dtau, x.options().dtype(at::kFloat));
  return {gx, grad_query, gbank, grel, gred, grad_tau};
}

}  // namespace
}  // namespace dwp

LVLM_ISA_EXPORT(diff_weighted_pool, dwp::dwp_forward)
LVLM_ISA_EXPORT(diff_weighted_pool_backward, dwp::dwp_backward)

}  // namespace LVLM_ISA
}  // namespace lvlm_fast

#if LVLM_ISA_REGISTER
LVLM_ISA_DECLARE(diff_weighted_pool)
LVLM_ISA_DECLARE(diff_weighted_pool_backward)
TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) {
  m.impl("diff_weighted_pool", LVLM_ISA_DISPATCH(diff_weighted_pool));
  m.impl("diff_weighted_pool_backward", LVLM_ISA_DISPATCH(diff_weighted_pool_backward));
}
#endif
