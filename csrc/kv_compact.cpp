// kv_compact (CPU): InfiniPot-V-style budgeted KV compaction, in place, with its
// query-agnostic scores (TaR, VaN) computed in the same call. Spec:
// lvlm_fast/reference/kv_compact.py; definitions: lvlm_fast/ops/kv_compact.py.
//
// Work split: one task per (layer, batch, KV head) (at::parallel_for over L*B*H); heads
// touch disjoint rows. Per head:
//   1. scores of the middle rows [p, n - r): TaR = -K^_i . M_j with M_j the mean of the
//      L2-normalised recent keys of patch j (a P x D table built first: each key read once),
//      VaN = ||V_i||; or a caller-given score. Accumulation in fp32 (fp64 for fp64 inputs).
//   2. selection (only when n > budget): std::nth_element under the strict total order
//      "higher score first, then earlier row" (NaN as -inf, -0 == +0): k1 rows by the
//      primary score, then k - k1 by the secondary among the rest. Deterministic.
//   3. move: rows in increasing order; kept row i goes to dest = #kept before i <= i. The
//      source row is read completely (into a local buffer) before its destination is
//      written, and a destination never is a row still to be read (dest <= i < later
//      sources): race-free in place. Keys are re-rotated by delta = dest - i RoPE positions
//      (HF rotate_half; cos/sin of delta * inv_freq in fp32 from a table over |delta| < C
//      built once and shared by all heads); only the first `rotary_pairs` frequency pairs
//      rotate (M-RoPE: the temporal section). Values are copied bit-exactly.
#include "common.h"

#include <algorithm>
#include <vector>

namespace lvlm_fast {
namespace {

using at::Tensor;

constexpr double kNormEps = 1e-9;

// Rank key: NaN -> -inf, -0 -> +0, so that float comparison is a total order on values.
inline float rank_key(float x) {
  if (std::isnan(x)) return -std::numeric_limits<float>::infinity();
  return x == 0.0f ? 0.0f : x;
}

// Marks in `keep` the `k` best candidates (rows in `cand`) of `score` (higher first, then
// earlier row). `cand` is reordered.
void select_top(std::vector<int64_t>& cand, const float* score, int64_t k, uint8_t* keep) {
  if (k <= 0 || cand.empty()) return;
  k = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
  auto better = [score](int64_t a, int64_t b) {
    const float ka = rank_key(score[a]), kb = rank_key(score[b]);
    return ka > kb || (ka == kb && a < b);
  };
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
  for (int64_t i = 0; i < k; ++i) keep[cand[i]] = 1;
}

// Sum of squares and dot product with kLanes independent partial sums: the compiler may
// not reorder one serial fp sum, but it vectorises these (fixed association order, so
// results are deterministic for a given D).
constexpr int kLanes = 8;

template <typename T, typename A>
inline A sum_sq(const T* x, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<A>(x[i + l]) * static_cast<A>(x[i + l]);
  A s = 0;
  for (; i < n; ++i) s += static_cast<A>(x[i]) * static_cast<A>(x[i]);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T, typename A>
inline void sum_sq_dot(const T* x, const A* m, int64_t n, A& ss, A& dot) {
  A a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(x[i + l]);
      a[l] += v * v;
      b[l] += v * m[i + l];
    }
  ss = 0;
  dot = 0;
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    ss += v * v;
    dot += v * m[i];
  }
  for (int l = 0; l < kLanes; ++l) {
    ss += a[l];
    dot += b[l];
  }
}

struct Params {
  int64_t n, budget, prefix, recent, tpf, primary_slots, rotary_pairs;
};

template <typename T>
void compact_impl(Tensor& key, Tensor& value, const c10::optional<Tensor>& scores,
                  const Params& P, const std::vector<float>& cs, Tensor& keep_out,
                  Tensor& score_out) {
  using A = acc_t<T>;
  const int64_t L = key.size(0), B = key.size(1), H = key.size(2), C = key.size(3);
  const int64_t D = key.size(4), DV = value.size(4), half = D / 2;
  T* kp = key.data_ptr<T>();
  T* vp = value.data_ptr<T>();
  const int64_t ksl = key.stride(0), ksb = key.stride(1), ksh = key.stride(2),
                ksn = key.stride(3);
  const int64_t vsl = value.stride(0), vsb = value.stride(1), vsh = value.stride(2),
                vsn = value.stride(3);
  const int64_t n = P.n, lo = P.prefix, hi = n - P.recent;
  const bool compress = n > P.budget;
  const int64_t k = P.budget - P.prefix - P.recent;
  const int64_t k1 = std::min(P.primary_slots, k);
  const bool tar = !scores.has_value() && P.tpf > 0 && P.recent >= P.tpf;
  const int64_t frames = tar ? P.recent / P.tpf : 0;
  // caller-given scores: any float dtype, any strides, read as fp32
  Tensor ext;
  if (scores.has_value()) ext = scores->to(at::kFloat);
  const float* ep = ext.defined() ? ext.data_ptr<float>() : nullptr;
  const int64_t esl = ext.defined() ? ext.stride(0) : 0, esb = ext.defined() ? ext.stride(1) : 0,
                esh = ext.defined() ? ext.stride(2) : 0, esn = ext.defined() ? ext.stride(3) : 0;
  uint8_t* keep_p = reinterpret_cast<uint8_t*>(keep_out.data_ptr<bool>());
  float* sp = score_out.data_ptr<float>();
  const int64_t plane = L * B * H * C;

  at::parallel_for(0, L * B * H, 1, [&](int64_t task_lo, int64_t task_hi) {
    std::vector<A> mean(static_cast<size_t>(tar ? P.tpf * D : 0));
    std::vector<A> row(static_cast<size_t>(std::max(D, DV)));
    std::vector<int64_t> cand;
    for (int64_t t = task_lo; t < task_hi; ++t) {
      const int64_t l = t / (B * H), b = (t / H) % B, h = t % H;
      T* kb = kp + l * ksl + b * ksb + h * ksh;
      T* vb = vp + l * vsl + b * vsb + h * vsh;
      float* prim = sp + t * C;
      float* sec = sp + plane + t * C;
      uint8_t* keep = keep_p + t * C;
      std::fill(prim, prim + C, 0.0f);
      std::fill(sec, sec + C, 0.0f);
      // ---- 1. scores of the middle rows
      if (hi > lo) {
        if (tar) {
          std::fill(mean.begin(), mean.end(), A(0));
          for (int64_t f = 0; f < frames; ++f) {
            for (int64_t j = 0; j < P.tpf; ++j) {
              const T* kr = kb + (hi + f * P.tpf + j) * ksn;
              const A ss = sum_sq<T, A>(kr, D);
              const A inv = A(1) / std::max<A>(std::sqrt(ss), static_cast<A>(kNormEps));
              A* m = mean.data() + j * D;
              for (int64_t i = 0; i < D; ++i) m[i] += static_cast<A>(kr[i]) * inv;
            }
          }
          for (auto& x : mean) x /= static_cast<A>(frames);
        }
        for (int64_t r = lo; r < hi; ++r) {
          if (ep) {
            prim[r] = ep[l * esl + b * esb + h * esh + r * esn];
            continue;
          }
          if (tar) {
            const int64_t j = P.tpf - 1 - ((hi - 1 - r) % P.tpf);
            const T* kr = kb + r * ksn;
            const A* m = mean.data() + j * D;
            A ss, dot;
            sum_sq_dot<T, A>(kr, m, D, ss, dot);
            prim[r] = static_cast<float>(-dot / std::max<A>(std::sqrt(ss), static_cast<A>(kNormEps)));
          }
          const T* vr = vb + r * vsn;
          sec[r] = static_cast<float>(std::sqrt(sum_sq<T, A>(vr, DV)));
        }
      }
      // ---- 2. selection
      std::fill(keep, keep + C, uint8_t(0));
      std::fill(keep, keep + n, uint8_t(1));
      if (!compress) continue;  // everything fits: nothing moves
      std::fill(keep + lo, keep + hi, uint8_t(0));
      cand.clear();
      for (int64_t r = lo; r < hi; ++r) cand.push_back(r);
      select_top(cand, prim, k1, keep);
      cand.clear();
      for (int64_t r = lo; r < hi; ++r)
        if (!keep[r]) cand.push_back(r);
      select_top(cand, sec, k - k1, keep);
      // ---- 3. move kept rows to the front, in order (race-free, see header)
      int64_t dest = lo;
      for (int64_t r = lo; r < n; ++r) {
        if (!keep[r]) continue;
        if (dest != r) {
          const T* ks = kb + r * ksn;
          T* kd = kb + dest * ksn;
          for (int64_t i = 0; i < D; ++i) row[i] = static_cast<A>(ks[i]);
          const float* c = cs.data() + (r - dest) * 2 * half;  // table of |delta|
          const float* s = c + half;
          const int64_t rot = P.rotary_pairs;
          for (int64_t i = 0; i < rot; ++i) {
            // delta = dest - r < 0: cos(-a) = cos(a), sin(-a) = -sin(a)
            const A x1 = row[i], x2 = row[i + half];
            kd[i] = static_cast<T>(x1 * c[i] + x2 * s[i]);
            kd[i + half] = static_cast<T>(x2 * c[i] - x1 * s[i]);
          }
          for (int64_t i = rot; i < half; ++i) {  // M-RoPE spatial pairs: moved unrotated
            kd[i] = static_cast<T>(row[i]);
            kd[i + half] = static_cast<T>(row[i + half]);
          }
          const T* vs = vb + r * vsn;
          T* vd = vb + dest * vsn;
          for (int64_t i = 0; i < DV; ++i) vd[i] = vs[i];  // vd < vs: forward copy is safe
        }
        ++dest;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> kv_compact_cpu(
    Tensor key, Tensor value, const Tensor& length, const Tensor& inv_freq,
    const c10::optional<Tensor>& scores, int64_t budget, int64_t prefix, int64_t recent,
    int64_t tokens_per_frame, int64_t primary_slots, int64_t rotary_pairs) {
  TORCH_CHECK(key.dim() == 5 && value.dim() == 5, "kv_compact: key/value must be 5-D");
  TORCH_CHECK(key.sizes().slice(0, 4) == value.sizes().slice(0, 4),
              "kv_compact: key and value must share (L, B, H, C)");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "kv_compact: dtype mismatch");
  TORCH_CHECK(key.stride(4) == 1 && value.stride(4) == 1,
              "kv_compact: last dim must be unit-stride");
  const int64_t D = key.size(4), C = key.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "kv_compact: head dim must be even");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == half,
              "kv_compact: inv_freq must be (D/2,)");
  TORCH_CHECK(length.numel() == 1 && length.scalar_type() == at::kLong,
              "kv_compact: length must be a 1-element int64 tensor");
  TORCH_CHECK(budget >= 1 && prefix >= 0 && recent >= 0 && prefix + recent <= budget,
              "kv_compact: need budget >= 1 and 0 <= prefix + recent <= budget");
  TORCH_CHECK(tokens_per_frame >= 0 && primary_slots >= 0 && rotary_pairs >= 0 &&
                  rotary_pairs <= half,
              "kv_compact: bad tokens_per_frame / primary_slots / rotary_pairs");
  if (scores.has_value())
    TORCH_CHECK(scores->dim() == 4 && scores->sizes() == key.sizes().slice(0, 4),
                "kv_compact: scores must be (L, B, H, C)");
  const int64_t n = std::min(std::max<int64_t>(length.item<int64_t>(), 0), C);
  Params P{n, budget, prefix, recent, tokens_per_frame, primary_slots, rotary_pairs};
  auto keep = at::empty({key.size(0), key.size(1), key.size(2), C},
                        key.options().dtype(at::kBool));
  auto score = at::empty({2, key.size(0), key.size(1), key.size(2), C},
                         key.options().dtype(at::kFloat));
  // cos/sin of |delta| * inv_freq (fp32 angles, like HF's rotary embedding), |delta| < C
  Tensor f = inv_freq.to(at::kFloat).contiguous();
  const float* fp = f.data_ptr<float>();
  const int64_t nd = n > budget ? n : 1;
  std::vector<float> cs(static_cast<size_t>(nd * 2 * half));
  at::parallel_for(0, nd, 64, [&](int64_t a, int64_t z) {
    for (int64_t dlt = a; dlt < z; ++dlt)
      for (int64_t i = 0; i < half; ++i) {
        const float ang = static_cast<float>(dlt) * fp[i];
        cs[dlt * 2 * half + i] = std::cos(ang);
        cs[dlt * 2 * half + half + i] = std::sin(ang);
      }
  });
  LVLM_DISPATCH_FLOATS(key.scalar_type(), "kv_compact", [&] {
    compact_impl<scalar_t>(key, value, scores, P, cs, keep, score);
  });
  auto new_length = at::full({}, std::min(n, budget), key.options().dtype(at::kLong));
  return {new_length, keep, score};
}

}  // namespace

TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) { m.impl("kv_compact", &kv_compact_cpu); }

}  // namespace lvlm_fast
