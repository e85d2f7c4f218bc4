// LLaMA-VID context + content tokens, CPU kernels (spec: lvlm_fast/reference/
// context_content_pool.py, definitions: lvlm_fast/ops/context_content_pool.py).
//
// Forward, parallel over frames (claimed one at a time by the threads, each claiming its
// next frame before pooling the current one). Per frame:
//   S = K (scale Q)^T          (P x Lqp) in per-thread scratch. fp32 accumulation in the
//                              AVX-512 compile: a register-blocked micro-kernel on packed
//                              queries (FrameScores; BLAS runs MKL's AVX2 code on AMD and
//                              reaches ~0.7 of its own rate at this thin shape); every
//                              other compile and fp64: at::mm on views (BLAS, single-
//                              threaded inside the frame loop)
//   softmax over P per query   lse[n, q] saved (float32; float64 for float64 inputs)
//   w[p] = mean_q softmax      one weight per patch
//   one pass over X's rows: context += w[p] X[p], content bin(s) of p += X[p], in
//   registers, while the next frame's keys are prefetched into cache
// Nothing of size (N, Lq, P) or (N, Lq, C) exists: the per-thread scratch is O(P * Lq +
// (1 + g*g) * C) plus an fp32 copy of the frame's keys (P x Ck) (and of X when keys are
// given) for fp16/bf16 inputs. Accumulation in fp32 (fp64 for fp64). The gradient GEMMs
// (grad_K = dS Q; grad_Q = dS^T K) go to ATen/BLAS on views (no copies for fp32/fp64); the
// loops around them are compiled per ISA (isa.h).
//
// Backward recomputes S per frame (with the forward's score routine, so exp(S - lse) sees
// the same rounding) from lse, then (A = softmax, gc = grad of the context)
//   dw[p] = gc . X[p];  D[q] = sum_p A[q,p] dw[p];  dS = scale/Lq * A * (dw - D)
//   grad_K = dS Q,  grad_Q = dS^T K (summed over frames for shared queries, per-thread
//   partial sums reduced in a fixed order),  grad_X = w gc + content grad + (grad_K if
//   keys is None), in 64-patch blocks so grad_K never needs a (P, C) scratch.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace lvlm_fast {
inline namespace LVLM_ISA {  // compiled once per ISA variant (isa.h)
namespace {

// ---------------------------------------------------------------- vector helpers
// GCC vector extensions as wide as the ISA of this compile (isa.h): 512-bit for the
// AVX-512 variant, 256-bit otherwise (one AVX2 register, or two SSE / NEON halves).
// All users are internal (anonymous namespace), so the vector-return ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// ---------------------------------------------------------------- scores micro-kernel
// S (P x Lqp) = K (P x Ck) Qs^T for fp32, AVX-512 compile only. BLAS (MKL) runs its AVX2
// code on AMD CPUs and reaches ~0.7 of its own 2048^3 rate at this thin shape (Lq = 32
// columns, K read once from DRAM); this register-blocked kernel uses the 512-bit FMAs.
// Tiling: 12 key rows x 32 query columns (24 zmm accumulators, 2 zmm of packed queries,
// keys broadcast straight from memory), or x 16 columns for a last 16-column panel; rows
// stream along Ck, the packed queries (Ck x 16|32 per panel, <= 180 KB at Ck 1408) stay
// in L2. Accumulation fp32 in registers over the full Ck (no partial-sum passes).
// Query columns are padded to a multiple of 16 with zero rows of Qs (Lqp).
#if defined(__AVX512F__)
#include <immintrin.h>
constexpr bool kScoreKernel = true;
constexpr int64_t kScoreCols = 16;  // query columns are padded to a multiple of this

// Qs (Lq, Ck) -> panels of 32 (then 16) columns, each Ck x width, k-major, zero-padded.
inline void pack_queries(const float* q, int64_t Lq, int64_t Ck, int64_t Lqp, float* dst) {
  for (int64_t j0 = 0; j0 < Lqp; j0 += 32) {
    const int64_t width = std::min<int64_t>(32, Lqp - j0);
    float* panel = dst + j0 * Ck;
    for (int64_t k = 0; k < Ck; ++k)
      for (int64_t j = 0; j < width; ++j)
        panel[k * width + j] = j0 + j < Lq ? q[(j0 + j) * Ck + k] : 0.0f;
  }
}

template <int R, int NV>
inline void score_tile(const float* a, int64_t lda, const float* b, int64_t Ck, float* c,
                       int64_t ldc) {
  __m512 acc[R][NV];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Ck; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * NV * 16 + v * 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
}

template <int NV>
inline void score_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t Ck,
                       float* c, int64_t ldc) {
  constexpr int kRows = 12;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) score_tile<kRows, NV>(a + r * lda, lda, b, Ck, c + r * ldc, ldc);
  a += r * lda;
  c += r * ldc;
  switch (rows - r) {  // the ragged tail of rows, one instantiation per count
#define LVLM_SCORE_TAIL(n) \
  case n:                   \
    score_tile<n, NV>(a, lda, b, Ck, c, ldc); \
    break;
    LVLM_SCORE_TAIL(1) LVLM_SCORE_TAIL(2) LVLM_SCORE_TAIL(3) LVLM_SCORE_TAIL(4)
    LVLM_SCORE_TAIL(5) LVLM_SCORE_TAIL(6) LVLM_SCORE_TAIL(7) LVLM_SCORE_TAIL(8)
    LVLM_SCORE_TAIL(9) LVLM_SCORE_TAIL(10) LVLM_SCORE_TAIL(11)
#undef LVLM_SCORE_TAIL
    default:
      break;
  }
}

// S (P x Lqp, row stride Lqp) = K Qs^T from the packed queries.
inline void scores_fp32(int64_t P, int64_t Ck, int64_t Lqp, const float* k, int64_t ldk,
                        const float* packed, float* S) {
  for (int64_t j0 = 0; j0 < Lqp; j0 += 32) {
    const float* panel = packed + j0 * Ck;
    if (Lqp - j0 >= 32)
      score_rows<2>(P, k, ldk, panel, Ck, S + j0, Lqp);
    else
      score_rows<1>(P, k, ldk, panel, Ck, S + j0, Lqp);
  }
}
#else
constexpr bool kScoreKernel = false;
constexpr int64_t kScoreCols = 1;
inline void pack_queries(const float*, int64_t, int64_t, int64_t, float*) {}
inline void scores_fp32(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float*) {}
#endif

// ---------------------------------------------------------------- helpers
template <typename T, typename S>
inline void to_acc(const S* src, int64_t n, T* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

constexpr int64_t kBlockP = 64;  // patch rows per backward block (grad_K scratch)

// Adaptive-pooling bins of the content grid: for each grid row / column, the bins that
// contain it (1 or 2 when bins overlap; more only if g > side), plus 1/(bin area).
struct Bins {
  int64_t g = 1, side = 1;
  std::vector<std::vector<int64_t>> row_bins, col_bins;
  std::vector<double> inv_area;                   // g*g
  std::vector<std::vector<int64_t>> patch_bins;  // per patch: the flat bins holding it
  std::vector<char> run_end;  // patch p is the last of a run of patches with the same bins
  Bins(int64_t P, int64_t grid) : g(grid) {
    if (g == 1) {
      inv_area = {1.0 / static_cast<double>(P)};
      patch_bins.assign(P, {0});
      return;
    }
    side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(P))));
    row_bins.assign(side, {});
    std::vector<int64_t> len(g);
    for (int64_t i = 0; i < g; ++i) {
      const int64_t s = (i * side) / g, e = ((i + 1) * side + g - 1) / g;
      len[i] = e - s;
      for (int64_t r = s; r < e; ++r) row_bins[r].push_back(i);
    }
    col_bins = row_bins;
    inv_area.resize(g * g);
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < g; ++j) inv_area[i * g + j] = 1.0 / static_cast<double>(len[i] * len[j]);
    patch_bins.assign(P, {});
    for (int64_t p = 0; p < P; ++p) for_bins(p, [&](int64_t b) { patch_bins[p].push_back(b); });
    run_end.assign(P, 0);
    for (int64_t p = 0; p < P; ++p) run_end[p] = p + 1 == P || patch_bins[p + 1] != patch_bins[p];
  }
  template <typename F>
  void for_bins(int64_t p, F&& f) const {
    if (g == 1) {
      f(int64_t(0));
      return;
    }
    const int64_t r = p / side, c = p % side;
    for (int64_t i : row_bins[r])
      for (int64_t j : col_bins[c]) f(i * g + j);
  }
};

// One pass over the frame's rows X (P x C, row stride ldx): acc[0] = sum_p w[p] X[p] (the
// context) and acc[1 + b] = sum of X[p] over the patches of content bin b (bins.patch_bins[p]:
// the bins that hold patch p; [0] for every p when there is one bin). 4 column vectors at
// a time: the context and the current run of patches with the same bins accumulate in
// registers; with several bins each run's sum is added into a (G x 4 vectors) block that
// stays in L1 (a run is side/g patches of a grid row at g > 1). `pf` (may be null): the next frame's keys (row
// stride ldpf, pf_cols columns), fetched into cache line by line alongside, so its score
// GEMM reads them from cache rather than DRAM.
template <typename T>
void weighted_and_binned_sum(int64_t P, int64_t C, const T* w, const T* X, int64_t ldx,
                             const Bins& bins, T* acc, const T* pf, int64_t ldpf, int64_t pf_cols) {
  using vec = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  constexpr int V = 4;
  const int64_t G = bins.g * bins.g;
  const auto& row_bins = bins.patch_bins;
  std::vector<vec> binacc(G > 1 ? G * V : 0);
  int64_t c0 = 0;
  for (; c0 + V * W <= C; c0 += V * W) {
    vec aw[V], a1[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) aw[j] = a1[j] = vec{};
    std::fill(binacc.begin(), binacc.end(), vec{});
    const int vpf = pf ? static_cast<int>(std::clamp<int64_t>((pf_cols - c0 + W - 1) / W, 0, V)) : 0;
    for (int64_t p = 0; p < P; ++p) {
      const T* xr = X + p * ldx + c0;
      const T wp = w[p];
      for (int j = 0; j < vpf; ++j) __builtin_prefetch(pf + p * ldpf + c0 + j * W, 0, 2);
      vec xv[V];
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) {
        xv[j] = vload(xr + j * W);
        aw[j] += xv[j] * wp;
      }
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) a1[j] += xv[j];
      // a run of patches with the same bins ends: add its plain sum into those bins
      if (G > 1 && bins.run_end[p]) {
        for (int64_t b : row_bins[p]) {
#pragma GCC unroll 4
          for (int j = 0; j < V; ++j) binacc[b * V + j] += a1[j];
        }
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) a1[j] = vec{};
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) {
      vstore(acc + c0 + j * W, aw[j]);
      if (G == 1) vstore(acc + C + c0 + j * W, a1[j]);
    }
    for (int64_t b = 0; b < G && G > 1; ++b)
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) vstore(acc + (1 + b) * C + c0 + j * W, binacc[b * V + j]);
  }
  if (pf) {  // next frame's columns the blocked loop did not reach (tail, or Ck > C)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = c0; c < pf_cols; c += W) __builtin_prefetch(pf + p * ldpf + c, 0, 2);
  }
  for (int64_t c = c0; c < C; ++c) {  // column tail, one at a time
    T aw = 0;
    for (int64_t b = 0; b < G; ++b) acc[(1 + b) * C + c] = 0;
    for (int64_t p = 0; p < P; ++p) {
      const T xv = X[p * ldx + c];
      aw += w[p] * xv;
      for (int64_t b : row_bins[p]) acc[(1 + b) * C + c] += xv;
    }
    acc[c] = aw;
  }
}

struct Shapes {
  int64_t N, P, C, Ck, Lq, Lqp, G;
  bool shared_q, has_keys;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& q, const c10::optional<at::Tensor>& keys,
                    int64_t grid, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (N, P, C), got ", x.sizes());
  TORCH_CHECK(q.dim() == 2 || q.dim() == 3, op, ": queries must be (Lq, Ck) or (N, Lq, Ck), got ",
              q.sizes());
  Shapes s{};
  s.N = x.size(0);
  s.P = x.size(1);
  s.C = x.size(2);
  s.has_keys = keys.has_value() && keys->defined();
  s.shared_q = q.dim() == 2;
  s.Lq = q.size(-2);
  s.Ck = s.has_keys ? keys->size(2) : s.C;
  TORCH_CHECK(s.N >= 1 && s.P >= 1 && s.C >= 1, op, ": x must have N, P, C >= 1, got ", x.sizes());
  TORCH_CHECK(s.Lq >= 1, op, ": queries must hold Lq >= 1 queries, got ", q.sizes());
  TORCH_CHECK(s.shared_q || q.size(0) == s.N, op, ": queries.shape[0] must equal N = ", s.N);
  TORCH_CHECK(q.size(-1) == s.Ck, op, ": queries channel dim must equal keys' (or x's) ", s.Ck);
  TORCH_CHECK(q.scalar_type() == x.scalar_type(), op, ": queries dtype must match x");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), op, ": CPU kernel got a non-CPU tensor");
  if (s.has_keys) {
    TORCH_CHECK(keys->dim() == 3 && keys->size(0) == s.N && keys->size(1) == s.P && s.Ck >= 1, op,
                ": keys must be (N, P, Ck) with N, P of x, got ", keys->sizes());
    TORCH_CHECK(keys->scalar_type() == x.scalar_type(), op, ": keys dtype must match x");
    TORCH_CHECK(keys->device().is_cpu(), op, ": CPU kernel got a non-CPU keys tensor");
  }
  TORCH_CHECK(grid >= 1, op, ": content_grid must be >= 1, got ", grid);
  if (grid > 1) {
    const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(s.P))));
    TORCH_CHECK(side * side == s.P, op, ": content_grid > 1 needs a square P, got P = ", s.P);
  }
  s.G = grid * grid;
  return s;
}

// A row-major (rows, cols) matrix view of existing memory (row stride ld, unit columns).
template <typename T>
at::Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// The frame's keys (P, Ck) as acc_t: a view of the input when the types match, else a
// converted copy in the thread's buffer (one (P, Ck) fp32 matrix, reused frame to frame).
template <typename T, typename S>
at::Tensor frame_keys(const Shapes& s, const S* kn, int64_t k_row_stride, at::Tensor& buf) {
  if constexpr (std::is_same_v<T, S>) {
    (void)buf;
    return mat<T>(kn, s.P, s.Ck, k_row_stride);
  } else {
    if (!buf.defined()) buf = at::empty({s.P, s.Ck}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    buf.copy_(mat<S>(kn, s.P, s.Ck, k_row_stride));
    return buf;
  }
}

// Scaled queries (Lq, Ck) per frame (or one shared set) as a contiguous acc_t tensor.
template <typename T>
at::Tensor scaled_queries(const at::Tensor& q, double scale) {
  return (q.to(c10::CppTypeToScalarType<T>::value) * scale).contiguous();
}

// Score rows per frame are Lqp wide: Lq for BLAS; padded to the micro-kernel's column
// multiple for fp32 accumulation when this compile has it (padded queries are zero).
inline int64_t score_cols(int64_t Lq, bool dbl) {
  return kScoreKernel && !dbl ? (Lq + kScoreCols - 1) / kScoreCols * kScoreCols : Lq;
}

// S_n = K_n (scale Q_n)^T (P x Lqp) for the forward and the backward alike (the backward
// recomputes the forward's scores, so both take the same summation order): the AVX-512
// micro-kernel on packed queries for fp32 accumulation when built, else BLAS on views.
template <typename T>
class FrameScores {
 public:
  static constexpr bool kPacks = kScoreKernel && std::is_same_v<T, float>;
  FrameScores(const Shapes& s, const at::Tensor& qs) : s_(s), qsp_(qs.data_ptr<T>()) {
    qstride_ = s.shared_q ? 0 : s.Lq * s.Ck;
    if constexpr (kPacks) {
      if (s.shared_q) {
        shared_.resize(s.Lqp * s.Ck);
        pack_queries(qsp_, s.Lq, s.Ck, s.Lqp, shared_.data());
      }
    }
  }
  // `pack`: the calling thread's buffer for per-frame queries (resized on first use).
  void operator()(const at::Tensor& kn, int64_t n, at::Tensor& Sc, std::vector<float>& pack) const {
    if constexpr (kPacks) {
      const float* panels = shared_.data();
      if (!s_.shared_q) {
        pack.resize(s_.Lqp * s_.Ck);
        pack_queries(qsp_ + n * qstride_, s_.Lq, s_.Ck, s_.Lqp, pack.data());
        panels = pack.data();
      }
      scores_fp32(s_.P, s_.Ck, s_.Lqp, kn.data_ptr<T>(), kn.stride(0), panels, Sc.data_ptr<T>());
    } else {
      (void)pack;
      at::mm_out(Sc, kn, mat<T>(qsp_ + n * qstride_, s_.Lq, s_.Ck, s_.Ck).t());
    }
  }

 private:
  const Shapes& s_;
  const T* qsp_;
  int64_t qstride_;
  std::vector<float> shared_;
};

// ---------------------------------------------------------------- forward
template <typename S>
void forward_impl(const at::Tensor& x, const at::Tensor& q, const at::Tensor* keys, const Shapes& s,
                  double scale_d, const Bins& bins, at::Tensor& out, at::Tensor& lse) {
  using T = acc_t<S>;
  const S* xp = x.data_ptr<S>();
  const S* kp = keys ? keys->data_ptr<S>() : xp;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const int64_t ks0 = keys ? keys->stride(0) : xs0, ks1 = keys ? keys->stride(1) : xs1;
  S* op = out.data_ptr<S>();
  T* lp = lse.data_ptr<T>();
  const int64_t rows_out = 1 + s.G;
  // scale * Q in acc_t, (Lq, Ck) or (N, Lq, Ck): Lq/P of the keys' size, made once.
  const at::Tensor qs = scaled_queries<T>(q, scale_d);
  const FrameScores<T> scores(s, qs);

  // Frames are claimed one at a time (common.h: parallel_dynamic): a frame is ~0.2 ms of
  // work at the LLaMA-VID shape, and every frame writes only its own out/lse rows.
  parallel_dynamic(s.N, 1, [&](auto& next) {
    std::vector<T> m(s.Lqp), l(s.Lqp), coef(s.Lqp), w(s.P);
    std::vector<T> acc((1 + s.G) * s.C);
    at::Tensor Sc = at::empty({s.P, s.Lqp}, qs.options()), kbuf, xbuf;
    std::vector<float> qpack;
    // Claim-ahead: the frame after this one is claimed before this one is pooled, so its
    // keys can be fetched into cache during the pooling pass (see weighted_and_plain_sum).
    int64_t n = 0, nxt = 0, end = 0;
    for (bool have = next(n, end); have; n = nxt) {
      const bool have_next = next(nxt, end);
      have = have_next;
      {
        // S = K_n (scale Q)^T: one BLAS GEMM on views (runs single-threaded in here).
        const at::Tensor kn = frame_keys<T>(s, kp + n * ks0, ks1, kbuf);
        scores(kn, n, Sc, qpack);
        T* Sp = Sc.data_ptr<T>();
        // Softmax over patches, one column per query (queries are contiguous in a row).
        std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
        for (int64_t p = 0; p < s.P; ++p) {
          const T* sr = Sp + p * s.Lqp;
#pragma omp simd
          for (int64_t i = 0; i < s.Lqp; ++i) m[i] = std::max(m[i], sr[i]);
        }
        std::fill(l.begin(), l.end(), T(0));
        for (int64_t p = 0; p < s.P; ++p) {
          T* sr = Sp + p * s.Lqp;
          for (int64_t i = 0; i < s.Lqp; ++i) {
            sr[i] = std::exp(sr[i] - m[i]);
            l[i] += sr[i];
          }
        }
        for (int64_t i = 0; i < s.Lqp; ++i) {
          if (i < s.Lq) {
            lp[n * s.Lq + i] = m[i] + std::log(l[i]);
            coef[i] = T(1) / (static_cast<T>(s.Lq) * l[i]);
          } else {
            coef[i] = T(0);  // padded query columns
          }
        }
        for (int64_t p = 0; p < s.P; ++p) {
          const T* sr = Sp + p * s.Lqp;
          T a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t i = 0; i < s.Lqp; ++i) a += sr[i] * coef[i];
          w[p] = a;
        }
        // One pass over the frame's rows: context and content accumulate together, on the
        // fp32 rows (the converted keys when keys is X, else a converted copy of X).
        const S* xn = xp + n * xs0;
        const T* xa;
        int64_t ldxa;
        const T* pf = nullptr;
        if constexpr (std::is_same_v<T, S>) {
          xa = xn;
          ldxa = xs1;
          if (have_next) pf = kp + nxt * ks0;
        } else if (!s.has_keys) {
          xa = kn.data_ptr<T>();
          ldxa = kn.stride(0);
        } else {
          if (!xbuf.defined()) xbuf = at::empty({s.P, s.C}, qs.options());
          xbuf.copy_(mat<S>(xn, s.P, s.C, xs1));
          xa = xbuf.data_ptr<T>();
          ldxa = s.C;
        }
        T* ctx = acc.data();
        weighted_and_binned_sum<T>(s.P, s.C, w.data(), xa, ldxa, bins, ctx, pf, ks1, s.Ck);
        S* on = op + n * rows_out * s.C;
        for (int64_t c = 0; c < s.C; ++c) on[c] = static_cast<S>(ctx[c]);
        for (int64_t b = 0; b < s.G; ++b) {
          const T inv = static_cast<T>(bins.inv_area[b]);
          const T* cont = ctx + (1 + b) * s.C;
          S* o = on + (1 + b) * s.C;
          for (int64_t c = 0; c < s.C; ++c) o[c] = static_cast<S>(cont[c] * inv);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> context_content_pool_cpu(const at::Tensor& x_in,
                                                            const at::Tensor& q_in,
                                                            const c10::optional<at::Tensor>& keys_in,
                                                            double scale, int64_t content_grid) {
  Shapes s = check_inputs(x_in, q_in, keys_in, content_grid, "context_content_pool");
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor q = unit_last_stride(q_in);
  at::Tensor keys;
  if (s.has_keys) keys = unit_last_stride(*keys_in);
  const bool dbl = x.scalar_type() == at::kDouble;
  s.Lqp = score_cols(s.Lq, dbl);
  const Bins bins(s.P, content_grid);
  at::Tensor out = at::empty({s.N, 1 + s.G, s.C}, x.options());
  at::Tensor lse = at::empty({s.N, s.Lq}, x.options().dtype(dbl ? at::kDouble : at::kFloat));
  LVLM_DISPATCH_FLOATS(x.scalar_type(), "context_content_pool_cpu", [&] {
    forward_impl<scalar_t>(x, q, s.has_keys ? &keys : nullptr, s, scale, bins, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------- backward
template <typename S>
void backward_impl(const at::Tensor& go, const at::Tensor& x, const at::Tensor& q, const at::Tensor* keys,
                   const Shapes& s, double scale_d, const Bins& bins, const at::Tensor& lse,
                   at::Tensor& gx, at::Tensor& gq, at::Tensor* gk) {
  using T = acc_t<S>;
  const T scale = static_cast<T>(scale_d);
  const S* xp = x.data_ptr<S>();
  const S* kp = keys ? keys->data_ptr<S>() : xp;
  const S* gop = go.data_ptr<S>();
  const T* lp = lse.data_ptr<T>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const int64_t ks0 = keys ? keys->stride(0) : xs0, ks1 = keys ? keys->stride(1) : xs1;
  const int64_t gos0 = go.stride(0), gos1 = go.stride(1);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1);
  S* gxp = gx.data_ptr<S>();
  S* gqp = gq.data_ptr<S>();
  S* gkp = gk ? gk->data_ptr<S>() : nullptr;
  const int64_t Lq = s.Lq, Lqp = s.Lqp, P = s.P, C = s.C, Ck = s.Ck;

  // Queries as acc_t: scaled (scores) and plain (grad_K = dS Q); (Lq, Ck) or (N, Lq, Ck).
  const at::Tensor qs = scaled_queries<T>(q, scale_d);
  const at::Tensor qfull = scaled_queries<T>(q, 1.0);
  const FrameScores<T> scores(s, qs);
  const T* qfp = qfull.data_ptr<T>();
  const int64_t qstride = s.shared_q ? 0 : Lq * Ck;
  const int64_t nchunks = std::min<int64_t>(s.N, at::get_num_threads());
  // Shared queries: one fp32 partial grad_Q per chunk, reduced below in chunk order.
  std::vector<T> gq_part(s.shared_q ? nchunks * Lq * Ck : 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<T> w(P), dw(P), D(Lqp), gc(C), gcont(s.G * C);
    std::vector<T> gkb(kBlockP * Ck), gxrow(C);
    std::vector<T> xrow(std::is_same_v<T, S> ? 0 : C);
    std::vector<T> gq_frame(s.shared_q ? 0 : Lq * Ck);
    at::Tensor Sc = at::empty({P, Lqp}, qs.options()), kbuf;
    const at::Tensor dS = Sc.narrow(1, 0, Lq);  // the real query columns
    std::vector<float> qpack;
    for (int64_t ci = cb; ci < ce; ++ci) {
      T* gq_acc = s.shared_q ? gq_part.data() + ci * Lq * Ck : gq_frame.data();
      if (s.shared_q) std::fill(gq_acc, gq_acc + Lq * Ck, T(0));
      for (int64_t n = ci * s.N / nchunks; n < (ci + 1) * s.N / nchunks; ++n) {
        const at::Tensor qf = mat<T>(qfp + n * qstride, Lq, Ck, Ck);
        if (!s.shared_q) std::fill(gq_acc, gq_acc + Lq * Ck, T(0));
        const S* xn = xp + n * xs0;
        const at::Tensor kmat = frame_keys<T>(s, kp + n * ks0, ks1, kbuf);
        scores(kmat, n, Sc, qpack);
        T* Sp = Sc.data_ptr<T>();
        // A = exp(S - lse) (padded query columns -> 0), w = mean_q A.
        const T* ln = lp + n * ls0;
        for (int64_t p = 0; p < P; ++p) {
          T* sr = Sp + p * Lqp;
          T a = 0;
          for (int64_t i = 0; i < Lq; ++i) {
            sr[i] = std::exp(sr[i] - ln[i * ls1]);
            a += sr[i];
          }
          for (int64_t i = Lq; i < Lqp; ++i) sr[i] = T(0);
          w[p] = a / static_cast<T>(Lq);
        }
        // Incoming gradients of the context row and the content rows (content pre-divided
        // by the bin area: each patch of bin b receives gcont[b] / area[b]).
        const S* gon = gop + n * gos0;
        to_acc(gon, C, gc.data());
        for (int64_t b = 0; b < s.G; ++b) {
          const T inv = static_cast<T>(bins.inv_area[b]);
          const S* src = gon + (1 + b) * gos1;
          for (int64_t c = 0; c < C; ++c) gcont[b * C + c] = static_cast<T>(src[c]) * inv;
        }
        // dw[p] = gc . X[p]
        for (int64_t p = 0; p < P; ++p) {
          const T* xr;
          if constexpr (std::is_same_v<T, S>) {
            xr = xn + p * xs1;
          } else {
            to_acc(xn + p * xs1, C, xrow.data());
            xr = xrow.data();
          }
          T a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t c = 0; c < C; ++c) a += xr[c] * gc[c];
          dw[p] = a;
        }
        std::fill(D.begin(), D.end(), T(0));
        for (int64_t p = 0; p < P; ++p) {
          const T* sr = Sp + p * Lqp;
          const T d = dw[p];
#pragma omp simd
          for (int64_t i = 0; i < Lqp; ++i) D[i] += sr[i] * d;
        }
        // dS = scale/Lq * A * (dw - D), in place.
        const T f = scale / static_cast<T>(Lq);
        for (int64_t p = 0; p < P; ++p) {
          T* sr = Sp + p * Lqp;
          for (int64_t i = 0; i < Lq; ++i) sr[i] = f * sr[i] * (dw[p] - D[i]);
        }
        // grad_Q += dS^T K (one GEMM over the frame's P rows).
        at::Tensor gq_view = mat<T>(gq_acc, Lq, Ck, Ck);
        gq_view.addmm_(dS.t(), kmat);
        S* gxn = gxp + n * P * C;
        at::Tensor gk_block = mat<T>(gkb.data(), kBlockP, Ck, Ck);
        for (int64_t p0 = 0; p0 < P; p0 += kBlockP) {
          const int64_t pb = std::min(kBlockP, P - p0);
          // grad_K rows of this block: dS[p0:p0+pb, :Lq] @ Q (Lq x Ck).
          at::Tensor gk_rows = gk_block.narrow(0, 0, pb);
          at::mm_out(gk_rows, dS.narrow(0, p0, pb), qf);
          for (int64_t r = 0; r < pb; ++r) {
            const int64_t p = p0 + r;
            const T wp = w[p];
            T* g = gxrow.data();
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) g[c] = wp * gc[c];
            bins.for_bins(p, [&](int64_t b) {
              const T* gb = gcont.data() + b * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) g[c] += gb[c];
            });
            const T* gkr = gkb.data() + r * Ck;
            if (keys == nullptr) {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) g[c] += gkr[c];
            } else {
              S* gkout = gkp + (n * P + p) * Ck;
              for (int64_t c = 0; c < Ck; ++c) gkout[c] = static_cast<S>(gkr[c]);
            }
            S* gxo = gxn + p * C;
            for (int64_t c = 0; c < C; ++c) gxo[c] = static_cast<S>(g[c]);
          }
        }
        if (!s.shared_q) {
          S* gqo = gqp + n * Lq * Ck;
          for (int64_t i = 0; i < Lq * Ck; ++i) gqo[i] = static_cast<S>(gq_acc[i]);
        }
      }
    }
  });
  if (s.shared_q) {
    for (int64_t i = 0; i < Lq * Ck; ++i) {
      T a = 0;
      for (int64_t ci = 0; ci < nchunks; ++ci) a += gq_part[ci * Lq * Ck + i];
      gqp[i] = static_cast<S>(a);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> context_content_pool_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& q_in,
    const c10::optional<at::Tensor>& keys_in, double scale, int64_t content_grid,
    const at::Tensor& lse) {
  Shapes s = check_inputs(x_in, q_in, keys_in, content_grid, "context_content_pool_backward");
  const bool dbl = x_in.scalar_type() == at::kDouble;
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == s.N && grad_out_in.size(1) == 1 + s.G &&
                  grad_out_in.size(2) == s.C,
              "context_content_pool_backward: grad_out must be (N, 1 + g*g, C), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type(),
              "context_content_pool_backward: grad_out dtype must match x");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.N && lse.size(1) == s.Lq,
              "context_content_pool_backward: lse must be (N, Lq), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == (dbl ? at::kDouble : at::kFloat),
              "context_content_pool_backward: lse must be float32 (float64 for float64 x)");
  const at::Tensor go = unit_last_stride(grad_out_in);
  const at::Tensor x = unit_last_stride(x_in);
  const at::Tensor q = unit_last_stride(q_in);
  at::Tensor keys;
  if (s.has_keys) keys = unit_last_stride(*keys_in);
  s.Lqp = score_cols(s.Lq, dbl);
  const Bins bins(s.P, content_grid);
  at::Tensor gx = at::empty({s.N, s.P, s.C}, x.options());
  at::Tensor gq = at::empty(q.sizes(), q.options());
  at::Tensor gk = s.has_keys ? at::empty({s.N, s.P, s.Ck}, x.options()) : at::empty({0}, x.options());
  LVLM_DISPATCH_FLOATS(x.scalar_type(), "context_content_pool_backward_cpu", [&] {
    backward_impl<scalar_t>(go, x, q, s.has_keys ? &keys : nullptr, s, scale, bins, lse, gx, gq,
                            s.has_keys ? &gk : nullptr);
  });
  return {gx, gq, gk};
}

}  // namespace

LVLM_ISA_EXPORT(context_content_pool, context_content_pool_cpu)
LVLM_ISA_EXPORT(context_content_pool_backward, context_content_pool_backward_cpu)

}  // namespace LVLM_ISA
}  // namespace lvlm_fast

#if LVLM_ISA_REGISTER
LVLM_ISA_DECLARE(context_content_pool)
LVLM_ISA_DECLARE(context_content_pool_backward)
TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) {
  m.impl("context_content_pool", LVLM_ISA_DISPATCH(context_content_pool));
  m.impl("context_content_pool_backward", LVLM_ISA_DISPATCH(context_content_pool_backward));
}
#endif
