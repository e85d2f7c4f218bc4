// keyframe_select on the CPU: ViLAMP differential keyframe selection (greedy + budget fill).
// Spec: lvlm_fast/reference/keyframe_select.py; definitions: lvlm_fast/ops/keyframe_select.py.
//
// Algorithm (no N x N matrix, O(N) extra memory, at most O(k N E) work):
//  1. norms and rel = cos(E[n], t) for every frame, parallel over frames.
//  2. Eligible frames (rel not NaN, rel >= floor) sorted by (rel desc, index asc).
//  3. The greedy walk in that order. "Visited" is lazy: a candidate is visited exactly when
//     its cosine to some frame selected before its turn exceeds the threshold, so each
//     candidate is checked against the <= k frames selected so far (stopping at the first
//     similar one) instead of sweeping all frames after each pick. Candidates are taken in
//     blocks: the checks against the frames selected before the block run in parallel,
//     then the block is resolved in order against the frames selected inside it.
//  4. The released budget fill (gaps, smallest spacing D by binary search, tail top-up).
// Cosines use acc_t (fp32; fp64 for fp64 inputs) with the reference's formula
// dot / (max(|a|, eps) * max(|b|, eps)) and the same operand order, so integer-valued
// inputs give bit-identical cosines and identical selections.
#include "common.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace lvlm_fast {
inline namespace LVLM_ISA {  // compiled once per ISA variant (isa.h)
namespace {

// Dot products in acc_t with 4 vector registers of independent partial sums per sum (the
// compiler turns the fixed-width inner loop into vector ops of this compile's ISA; fewer
// running sums would be bound by the FMA latency, not by loads), then a fixed pairwise
// combination: deterministic, and exact for integer-valued data.
#if defined(__AVX512F__)
constexpr int kDotBytes = 256;  // 4 x 512 bits
#elif defined(__AVX__)
constexpr int kDotBytes = 128;  // 4 x 256 bits
#else
constexpr int kDotBytes = 64;   // 4 x 128 bits (SSE2 / NEON)
#endif

// The pairwise combination of the lanes, fully unrolled so that it compiles to a few
// vector adds in registers: as a rolled loop it went through the stack and cost more than
// the 512-element dot itself (perf: ~40% of the op in this loop).
template <typename acc_t>
inline acc_t reduce_lanes(acc_t* s) {
  constexpr int L = kDotBytes / static_cast<int>(sizeof(acc_t));
#pragma GCC unroll 8
  for (int w = L / 2; w > 0; w /= 2) {
#pragma GCC unroll 64
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  }
  return s[0];
}

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t e) {
  constexpr int L = kDotBytes / static_cast<int>(sizeof(acc_t));
  acc_t s[L] = {};
  int64_t i = 0;
  for (; i + L <= e; i += L) {
    for (int l = 0; l < L; ++l) s[l] += a[i + l] * b[i + l];
  }
  acc_t tail = acc_t(0);
  for (; i < e; ++i) tail += a[i] * b[i];
  return reduce_lanes(s) + tail;
}

// a.a and a.b in ONE sweep over a (the relevance pass: the row's norm and its dot with the
// query), same lane layout and combination as dot(), so each result equals dot()'s.
template <typename acc_t>
inline void dot_sq(const acc_t* __restrict a, const acc_t* __restrict b, int64_t e, acc_t& aa,
                   acc_t& ab) {
  constexpr int L = kDotBytes / static_cast<int>(sizeof(acc_t));
  acc_t s[L] = {}, t[L] = {};
  int64_t i = 0;
  for (; i + L <= e; i += L) {
    for (int l = 0; l < L; ++l) {
      const acc_t x = a[i + l];
      s[l] += x * x;
      t[l] += x * b[i + l];
    }
  }
  acc_t sa = acc_t(0), sb = acc_t(0);
  for (; i < e; ++i) {
    sa += a[i] * a[i];
    sb += a[i] * b[i];
  }
  aa = reduce_lanes(s) + sa;
  ab = reduce_lanes(t) + sb;
}

// Row i as acc_t: the row itself when no conversion is needed, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* row, acc_t* buf, int64_t e) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t i = 0; i < e; ++i) buf[i] = static_cast<acc_t>(row[i]);
    return buf;
  }
}

// The walk reads candidate rows in relevance order, i.e. scattered through memory: fetch
// the next one while the current one is checked.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* r, int64_t e) {
  const char* p = reinterpret_cast<const char*>(r);
  const int64_t bytes = e * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The released budget fill on a 0/1 mask of selected frames; `missing` = k - selected.
void budget_fill(std::vector<uint8_t>& mask, int64_t missing) {
  const int64_t n = static_cast<int64_t>(mask.size());
  if (missing <= 0) return;
  std::vector<std::pair<int64_t, int64_t>> gaps;  // (start, length) of unselected runs
  for (int64_t i = 0; i < n;) {
    if (mask[i]) {
      ++i;
      continue;
    }
    const int64_t s = i;
    while (i < n && !mask[i]) ++i;
    gaps.emplace_back(s, i - s);
  }
  auto needed = [&](int64_t d) {
    int64_t t = 0;
    for (const auto& g : gaps) t += ceil_div(g.second, d) - 1;
    return t;
  };
  int64_t lo = 1, hi = n;  // smallest spacing whose per-gap splits fit in `missing`
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (needed(mid) <= missing)
      hi = mid;
    else
      lo = mid + 1;
  }
  int64_t added = 0;
  for (const auto& g : gaps) {
    const int64_t kg = ceil_div(g.second, lo) - 1;
    if (kg <= 0) continue;
    const int64_t step = ceil_div(g.second, kg + 1);
    const int64_t end = g.first + g.second - 1;
    for (int64_t j = 1; j <= kg; ++j) mask[std::min(g.first + j * step, end)] = 1;
    added += kg;
  }
  int64_t left = missing - added;  // the rest: highest-index free frames
  for (int64_t i = n - 1; i >= 0 && left > 0; --i) {
    if (!mask[i]) {
      mask[i] = 1;
      --left;
    }
  }
}

template <typename scalar_t>
std::vector<int64_t> greedy(const at::Tensor& fe, const at::Tensor& q, int64_t k,
                            double threshold, std::optional<double> floor) {
  using acc = acc_t<scalar_t>;
  const int64_t n = fe.size(0), e = fe.size(1), sn = fe.stride(0);
  const scalar_t* base = fe.const_data_ptr<scalar_t>();
  auto row = [=](int64_t i) { return base + i * sn; };
  const acc eps = static_cast<acc>(kCosEps);
  std::vector<acc> qbuf(e);
  const acc* qa = as_acc<scalar_t, acc>(q.const_data_ptr<scalar_t>(), qbuf.data(), e);
  const acc qn = std::max(std::sqrt(dot<acc>(qa, qa, e)), eps);

  // 1. norms and relevance (the reference's operand order: dot / (|t| * |E[n]|))
  std::vector<acc> norm(n), rel(n);
  // Threads only where they pay: one core streams this pass at ~0.7 of the 2-core read
  // bandwidth (measured 22 vs 32 GB/s on the 2-core EPYC), so splitting saves well under a
  // millisecond below ~64 MB of rows, while a parallel region on a shared machine can wait
  // a scheduler time slice (milliseconds) for a descheduled worker. Chunks of >= 32 MB.
  const int64_t row_bytes = e * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t row_grain = std::max<int64_t>(1, (int64_t{32} << 20) / row_bytes);
  at::parallel_for(0, n, row_grain, [&](int64_t lo, int64_t hi) {
    std::vector<acc> buf(std::is_same_v<scalar_t, acc> ? 0 : e);
    for (int64_t i = lo; i < hi; ++i) {
      const acc* r = as_acc<scalar_t, acc>(row(i), buf.data(), e);
      acc rr, rq;
      dot_sq<acc>(r, qa, e, rr, rq);
      const acc nn = std::max(std::sqrt(rr), eps);
      norm[i] = nn;
      rel[i] = rq / (qn * nn);
    }
  });

  // 2. eligible frames by (rel desc, index asc)
  const acc thr = static_cast<acc>(threshold);
  const acc flo = floor ? static_cast<acc>(*floor) : acc(0);
  std::vector<int64_t> cand;
  cand.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const acc r = rel[i];
    if (r != r) continue;                 // NaN relevance: never selected by the walk
    if (floor && !(r >= flo)) continue;   // the walk stops at the first rel < floor
    cand.push_back(i);
  }
  std::sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) {
    return rel[a] > rel[b] || (rel[a] == rel[b] && a < b);
  });

  // 3. the walk. Selected rows are kept as acc_t copies (k x E).
  const int64_t kmax = std::min(k, n);
  const int64_t m = static_cast<int64_t>(cand.size());
  std::vector<int64_t> picks;
  picks.reserve(kmax);
  std::vector<acc> pick_rows;
  // cosine(selected t, candidate row cr of frame j) > threshold; NaN compares false
  auto similar = [&](int64_t t, const acc* cr, int64_t j) {
    const acc d = dot<acc>(pick_rows.data() + t * e, cr, e);
    return d / (norm[picks[t]] * norm[j]) > thr;
  };
  auto select = [&](int64_t j, const acc* cr) {
    picks.push_back(j);
    pick_rows.insert(pick_rows.end(), cr, cr + e);
  };
  std::vector<uint8_t> rejected;
  std::vector<acc> buf(std::is_same_v<scalar_t, acc> ? 0 : e);
  int64_t pos = 0, block = 32;
  while (static_cast<int64_t>(picks.size()) < kmax && pos < m) {
    const int64_t b = std::min(block, m - pos);
    const int64_t s0 = static_cast<int64_t>(picks.size());
    rejected.assign(b, 0);
    if (s0 > 0) {
      // A parallel region only for >= ~8M multiply-adds (worst case, no early exit) per
      // thread, i.e. a few ms of work: on a shared machine each region can wait a time
      // slice for a descheduled worker, and the usual walk (tens of picks, hundreds of
      // candidates, most rejected by the first pick tried) is far below that, so it runs
      // on the calling thread with no synchronisation at all.
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 23) / (s0 * e));
      at::parallel_for(0, b, grain, [&](int64_t lo, int64_t hi) {
        std::vector<acc> tbuf(std::is_same_v<scalar_t, acc> ? 0 : e);
        int64_t hint = s0 - 1;  // the pick that rejected the previous candidate goes first
        for (int64_t c = lo; c < hi; ++c) {
          const int64_t j = cand[pos + c];
          if (c + 1 < hi) prefetch_row(row(cand[pos + c + 1]), e);  // rows come in rel order
          const acc* cr = as_acc<scalar_t, acc>(row(j), tbuf.data(), e);
          if (similar(hint, cr, j)) {
            rejected[c] = 1;
            continue;
          }
          for (int64_t t = s0 - 1; t >= 0; --t) {
            if (t != hint && similar(t, cr, j)) {
              rejected[c] = 1;
              hint = t;
              break;
            }
          }
        }
      });
    }
    for (int64_t c = 0; c < b && static_cast<int64_t>(picks.size()) < kmax; ++c) {
      if (rejected[c]) continue;
      const int64_t j = cand[pos + c];
      const acc* cr = as_acc<scalar_t, acc>(row(j), buf.data(), e);
      bool keep = true;
      for (int64_t t = s0; t < static_cast<int64_t>(picks.size()) && keep; ++t)
        keep = !similar(t, cr, j);
      if (keep) select(j, cr);
    }
    pos += b;
    block = std::min<int64_t>(block * 2, 4096);
  }
  return picks;
}

std::tuple<at::Tensor, at::Tensor> keyframe_select_cpu(const at::Tensor& frame_emb,
                                                       const at::Tensor& query_emb, int64_t k,
                                                       double threshold,
                                                       std::optional<double> min_relevance,
                                                       bool fill) {
  TORCH_CHECK(frame_emb.dim() == 2 && frame_emb.size(0) >= 1 && frame_emb.size(1) >= 1,
              "keyframe_select: frame_emb must be (N, E) with N, E >= 1, got ",
              frame_emb.sizes());
  const int64_t n = frame_emb.size(0), e = frame_emb.size(1);
  TORCH_CHECK(query_emb.numel() == e && query_emb.dim() >= 1 && query_emb.dim() <= 2 &&
                  query_emb.size(-1) == e,
              "keyframe_select: query_emb must be (E,) with E = frame_emb.shape[1] = ", e,
              ", got ", query_emb.sizes());
  TORCH_CHECK(frame_emb.scalar_type() == query_emb.scalar_type(),
              "keyframe_select: query_emb has dtype ", query_emb.scalar_type(),
              " but frame_emb has dtype ", frame_emb.scalar_type());
  TORCH_CHECK(frame_emb.device().is_cpu() && query_emb.device().is_cpu(),
              "keyframe_select: CPU kernel got non-CPU tensors");
  TORCH_CHECK(k >= 1, "keyframe_select: k must be >= 1, got ", k);
  TORCH_CHECK(threshold >= -1.0 && threshold <= 1.0,
              "keyframe_select: threshold must be in [-1, 1], got ", threshold);
  TORCH_CHECK(!min_relevance || std::isfinite(*min_relevance),
              "keyframe_select: min_relevance must be finite, got ", *min_relevance);

  const at::Tensor fe = unit_last_stride(frame_emb);
  const at::Tensor q = query_emb.reshape({e}).contiguous();
  std::vector<int64_t> picks;
  LVLM_DISPATCH_FLOATS(fe.scalar_type(), "keyframe_select_cpu", [&] {
    picks = greedy<scalar_t>(fe, q, k, threshold, min_relevance);
  });

  std::vector<uint8_t> mask(n, 0);
  for (const int64_t p : picks) mask[p] = 1;
  if (fill) budget_fill(mask, k - static_cast<int64_t>(picks.size()));

  const int64_t kmax = std::min(k, n);
  auto opts = frame_emb.options().dtype(at::kLong);
  at::Tensor indices = at::empty({kmax}, opts);
  at::Tensor ref_index = at::empty({n}, opts);
  int64_t* idx = indices.data_ptr<int64_t>();
  int64_t* ref = ref_index.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mask[i]) {
      TORCH_INTERNAL_ASSERT(count < kmax, "keyframe_select: more than min(k, N) frames");
      idx[count++] = i;
    }
    ref[i] = count - 1;  // nearest keyframe at or before frame i; -1 before the first
  }
  TORCH_INTERNAL_ASSERT(!fill || count == kmax, "keyframe_select: fill gave ", count,
                        " frames, expected ", kmax);
  for (int64_t c = count; c < kmax; ++c) idx[c] = -1;
  return {indices, ref_index};
}

}  // namespace

LVLM_ISA_EXPORT(keyframe_select, keyframe_select_cpu)

}  // namespace LVLM_ISA
}  // namespace lvlm_fast

#if LVLM_ISA_REGISTER
LVLM_ISA_DECLARE(keyframe_select)
TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) { m.impl("keyframe_select", LVLM_ISA_DISPATCH(keyframe_select)); }
#endif
