// SlowFast dual-stream pooling, CPU kernels (spec: lvlm_fast/reference/slowfast_pool.py,
// definitions: lvlm_fast/ops/slowfast_pool.py).
//
// Forward: parallel over frames. Each frame is streamed once, row by row, patch by patch
// (full D per patch, unit stride). From that one read every patch updates
//   - its slow window accumulator (sum, or running max + window-local arg-max) for the
//     current band of kh rows, written out when the band ends, and
//   - the column-bin sums of the current row (one or two fast column bins per patch when
//     bins overlap), folded into the one or two fast row bins of that row.
// Accumulators are fp32 (fp64 for fp64) per-thread buffers of O((W/kw + oh*ow + ow) * D),
// never (T, P, D). Backward is a gather: every input patch's gradient row is assembled
// from its slow window's gradient (even share, or arg-max select) and its <= 2x2 fast bins'
// gradients, and written once.
#include <algorithm>
#include <string_view>
#include <vector>

#include "common.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lvlm_fast {
inline namespace LVLM_ISA {  // compiled once per ISA variant (isa.h)
namespace {

struct Params {
  int64_t T, H, W, D, kh, kw, SH, SW, S, fh, fw, F, Ns;
  bool is_max, fast_all, interleaved, has_sep;
};

inline int64_t bin_start(int64_t i, int64_t size, int64_t out) { return (i * size) / out; }
inline int64_t bin_end(int64_t i, int64_t size, int64_t out) {
  return ((i + 1) * size + out - 1) / out;
}

Params make_params(int64_t T, int64_t H, int64_t W, int64_t D, int64_t Ns, at::IntArrayRef slow_kernel,
                   std::string_view slow_mode, at::IntArrayRef fast_grid, std::string_view fast_frames,
                   std::string_view order, bool has_sep) {
  TORCH_CHECK(slow_kernel.size() == 2 && fast_grid.size() == 2,
              "slowfast_pool: slow_kernel and fast_grid must have 2 entries");
  TORCH_CHECK(slow_mode == "avg" || slow_mode == "max", "slowfast_pool: slow_mode must be avg or max");
  TORCH_CHECK(fast_frames == "all" || fast_frames == "non_slow",
              "slowfast_pool: fast_frames must be all or non_slow");
  TORCH_CHECK(order == "slow_fast" || order == "interleaved",
              "slowfast_pool: order must be slow_fast or interleaved");
  Params p{};
  p.T = T; p.H = H; p.W = W; p.D = D; p.Ns = Ns;
  p.kh = slow_kernel[0]; p.kw = slow_kernel[1];
  p.fh = fast_grid[0]; p.fw = fast_grid[1];
  TORCH_CHECK(T >= 1 && H >= 1 && W >= 1 && D >= 1, "slowfast_pool: x must have T, H, W, D >= 1");
  TORCH_CHECK(p.kh >= 1 && p.kw >= 1 && H % p.kh == 0 && W % p.kw == 0,
              "slowfast_pool: slow_kernel (", p.kh, ", ", p.kw, ") must divide the grid (", H, ", ", W, ")");
  TORCH_CHECK(p.fh >= 1 && p.fw >= 1 && p.fh <= H && p.fw <= W,
              "slowfast_pool: fast_grid (", p.fh, ", ", p.fw, ") must be in [1, grid (", H, ", ", W, ")]");
  TORCH_CHECK(Ns <= T, "slowfast_pool: slow_index longer than T");
  p.SH = H / p.kh; p.SW = W / p.kw; p.S = p.SH * p.SW; p.F = p.fh * p.fw;
  p.is_max = slow_mode == "max";
  p.fast_all = fast_frames == "all";
  p.interleaved = order == "interleaved";
  p.has_sep = has_sep;
  return p;
}

int64_t total_rows(const Params& p) {
  const int64_t nf = p.fast_all ? p.T : p.T - p.Ns;
  const int64_t seps = p.has_sep ? (p.interleaved ? p.T : 1) : 0;
  return p.Ns * p.S + nf * p.F + seps;
}

// Per-frame output rows (-1 = none) and slow rank; mirrors frame_slots() in the op module.
struct Slots {
  std::vector<int64_t> slow, fast, sep, rank;
};

Slots make_slots(const Params& p, const at::Tensor& slow_index) {
  TORCH_CHECK(slow_index.dim() == 1 && slow_index.size(0) == p.Ns, "slowfast_pool: slow_index must be 1-D");
  TORCH_CHECK(slow_index.scalar_type() == at::kLong || slow_index.scalar_type() == at::kInt,
              "slowfast_pool: slow_index must be int32 or int64");
  TORCH_CHECK(slow_index.device().is_cpu(), "slowfast_pool: slow_index must be on the CPU with x");
  const at::Tensor idx = slow_index.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  Slots s;
  s.slow.assign(p.T, -1); s.fast.assign(p.T, -1); s.sep.assign(p.T, -1); s.rank.assign(p.T, -1);
  for (int64_t k = 0; k < p.Ns; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < p.T, "slowfast_pool: slow_index values must be in [0, T = ", p.T,
                "), got ", ip[k]);
    TORCH_CHECK(k == 0 || ip[k] > ip[k - 1], "slowfast_pool: slow_index must be strictly increasing");
    s.rank[ip[k]] = k;
  }
  const int64_t sep = p.has_sep ? 1 : 0;
  int64_t ns_before = 0, nf_before = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    const bool slow = s.rank[t] >= 0;
    const bool fast = p.fast_all || !slow;
    if (p.interleaved) {
      const int64_t base = ns_before * p.S + nf_before * p.F + t * sep;
      if (slow) s.slow[t] = base;
      if (fast) s.fast[t] = base + (slow ? p.S : 0);
      if (p.has_sep) s.sep[t] = base + (slow ? p.S : 0) + (fast ? p.F : 0);
    } else {
      if (slow) s.slow[t] = ns_before * p.S;
      if (fast) s.fast[t] = p.Ns * p.S + sep + nf_before * p.F;
      if (p.has_sep && t == 0) s.sep[t] = p.Ns * p.S;
    }
    ns_before += slow;
    nf_before += fast;
  }
  return s;
}

// Column -> first/last fast column bin containing it (bins overlap by at most one column,
// and no column is in three bins when fw <= W); same for rows.
void bin_table(int64_t size, int64_t out, std::vector<int64_t>& first, std::vector<int64_t>& last) {
  first.assign(size, -1);
  last.assign(size, -1);
  for (int64_t i = 0; i < out; ++i) {
    for (int64_t c = bin_start(i, size, out); c < bin_end(i, size, out); ++c) {
      if (first[c] < 0) first[c] = i;
      last[c] = i;
    }
  }
}

// Large outputs come straight from mmap (glibc serves >32 MB that way), so writing them
// costs one page fault per 4 KB page, which on a VM rivals the streaming read of x. Ask
// for transparent huge pages on the 2 MB-aligned interior of the fresh buffer (a hint on
// memory this tensor owns; a no-op where THP is off or unsupported).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t nbytes = uintptr_t(t.numel()) * t.element_size();
  if (nbytes < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + nbytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

template <typename scalar_t>
void fwd_impl(const at::Tensor& x, const Params& p, const Slots& sl, const scalar_t* sep,
              at::Tensor& out, at::Tensor& argmax, bool need_argmax) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, W = p.W, H = p.H;
  const int64_t sT = x.stride(0), sH = x.stride(1), sW = x.stride(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  int32_t* ap = need_argmax ? argmax.data_ptr<int32_t>() : nullptr;
  std::vector<int64_t> cfirst, clast, rfirst, rlast;
  bin_table(W, p.fw, cfirst, clast);
  bin_table(H, p.fh, rfirst, rlast);
  std::vector<acc> inv_cnt(p.F);
  for (int64_t i = 0; i < p.fh; ++i)
    for (int64_t j = 0; j < p.fw; ++j)
      inv_cnt[i * p.fw + j] = acc(1) / acc((bin_end(i, H, p.fh) - bin_start(i, H, p.fh)) *
                                          (bin_end(j, W, p.fw) - bin_start(j, W, p.fw)));
  const acc inv_win = acc(1) / acc(p.kh * p.kw);

  // Channel blocking: the per-thread accumulators of one D-chunk (slow band, column sums,
  // arg-max) stay in L1 while a frame streams through; every element is still read once.
  const int64_t per_ch = (p.SW * (p.is_max ? 2 : 1) + p.fw) * int64_t(sizeof(acc));
  const int64_t DC = D; (void)per_ch;

  // Frames claimed one at a time (common.h: parallel_dynamic); each writes its own rows.
  parallel_dynamic(p.T, 1, [&](auto& next) {
    std::vector<acc> sacc(p.SW * DC), colsum(p.fw * DC), facc(p.F * DC);
    std::vector<int32_t> sarg(ap != nullptr ? p.SW * DC : 0);
    for (int64_t t0, t1; next(t0, t1);)
    for (int64_t t = t0; t < t1; ++t) {
      const bool slow = sl.slow[t] >= 0, fast = sl.fast[t] >= 0;
      for (int64_t d0 = 0; d0 < D; d0 += DC) {
        const int64_t Dn = std::min(DC, D - d0);
        if (fast) std::fill(facc.begin(), facc.end(), acc(0));
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* xrow = xp + t * sT + h * sH + d0;
          const int64_t dh = h % p.kh;
          if (slow && !p.is_max && dh == 0) std::fill(sacc.begin(), sacc.end(), acc(0));
          if (fast) std::fill(colsum.begin(), colsum.end(), acc(0));
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* __restrict__ xv = xrow + w * sW;
            acc* __restrict__ c0 = colsum.data() + cfirst[w] * DC;
            acc* __restrict__ c1 = colsum.data() + clast[w] * DC;
            const bool two = clast[w] != cfirst[w];
            acc* __restrict__ sa = sacc.data() + (w / p.kw) * DC;
            const int32_t k = static_cast<int32_t>(dh * p.kw + w % p.kw);
            if (slow && !p.is_max) {
              if (fast && !two) {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) { const acc v = acc(xv[d]); sa[d] += v; c0[d] += v; }
              } else {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) sa[d] += acc(xv[d]);
              }
            } else if (slow) {  // max: first max in row-major window order, first NaN wins
              int32_t* __restrict__ ga = sarg.data() + (w / p.kw) * DC;
              if (k == 0) {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) sa[d] = acc(xv[d]);
                if (ap != nullptr) std::fill(ga, ga + Dn, 0);
              } else if (ap != nullptr) {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) {
                  const acc v = acc(xv[d]);
                  const bool take = (v > sa[d]) || (v != v && sa[d] == sa[d]);
                  sa[d] = take ? v : sa[d];
                  ga[d] = take ? k : ga[d];
                }
              } else {  // inference: no arg-max to track
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) {
                  const acc v = acc(xv[d]);
                  sa[d] = ((v > sa[d]) || (v != v && sa[d] == sa[d])) ? v : sa[d];
                }
              }
            }
            if (fast && (two || !slow || p.is_max)) {
              if (two) {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) { const acc v = acc(xv[d]); c0[d] += v; c1[d] += v; }
              } else {
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) c0[d] += acc(xv[d]);
              }
            }
          }
          if (fast) {
            for (int64_t i = rfirst[h]; i <= rlast[h]; ++i) {
              acc* __restrict__ fr = facc.data() + i * p.fw * DC;
              const acc* __restrict__ cs = colsum.data();
#pragma omp simd
              for (int64_t e = 0; e < p.fw * DC; ++e) fr[e] += cs[e];
            }
          }
          if (slow && dh == p.kh - 1) {
            const int64_t row = sl.slow[t] + (h / p.kh) * p.SW;
            const acc scale = p.is_max ? acc(1) : inv_win;
            for (int64_t j = 0; j < p.SW; ++j) {
              scalar_t* __restrict__ o = op + (row + j) * D + d0;
              const acc* __restrict__ src = sacc.data() + j * DC;
#pragma omp simd
              for (int64_t d = 0; d < Dn; ++d) o[d] = scalar_t(src[d] * scale);
              if (ap != nullptr) {
                int32_t* a = ap + (sl.rank[t] * p.S + (h / p.kh) * p.SW + j) * D + d0;
                std::copy(sarg.data() + j * DC, sarg.data() + j * DC + Dn, a);
              }
            }
          }
        }
        if (fast) {
          for (int64_t f = 0; f < p.F; ++f) {
            scalar_t* __restrict__ o = op + (sl.fast[t] + f) * D + d0;
            const acc* __restrict__ src = facc.data() + f * DC;
            const acc c = inv_cnt[f];
#pragma omp simd
            for (int64_t d = 0; d < Dn; ++d) o[d] = scalar_t(src[d] * c);
          }
        }
      }
      if (sl.sep[t] >= 0) std::copy(sep, sep + D, op + sl.sep[t] * D);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Window-at-a-time path for the common small slow kernels (1x2: the released 1-D pairwise
// pool, 2x2, 1x1). A frame is walked band by band (KH rows) and window by window (KW
// columns); one D-loop reads the KH*KW patches of the window once and, in registers,
// produces the slow token (written straight to the output: no band accumulator) and the
// window's per-row partial sums, added once to the row's fast column-bin sums. This cuts
// the read-modify-write traffic on accumulators by KH*KW compared with the per-patch loop
// (fwd_impl below), which remains the path for every other kernel size.
// SM: 0 no slow, 1 avg, 2 max, 3 max + arg-max. NF: fast column bins of the window (0..2).
template <int KH, int KW, int SM, int NF, typename scalar_t, typename acc>
inline void window_pass(const scalar_t* const* P, scalar_t* __restrict__ o, int32_t* __restrict__ a,
                        acc* const* c0, acc* const* c1, acc scale, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    acc rs[KH];
    for (int r = 0; r < KH; ++r) {
      acc v = acc(0);
      for (int c = 0; c < KW; ++c) v += acc(P[r * KW + c][d]);
      rs[r] = v;
    }
    if constexpr (SM == 1) {
      acc tot = acc(0);
      for (int r = 0; r < KH; ++r) tot += rs[r];
      o[d] = scalar_t(tot * scale);
    }
    if constexpr (SM >= 2) {  // first max in row-major window order, first NaN wins
      acc best = acc(P[0][d]);
      int32_t arg = 0;
      for (int k = 1; k < KH * KW; ++k) {
        const acc v = acc(P[k][d]);
        const bool take = (v > best) || (v != v && best == best);
        best = take ? v : best;
        arg = take ? k : arg;
      }
      o[d] = scalar_t(best);
      if constexpr (SM == 3) a[d] = arg;
    }
    if constexpr (NF >= 1) {
      for (int r = 0; r < KH; ++r) c0[r][d] += rs[r];
    }
    if constexpr (NF == 2) {
      for (int r = 0; r < KH; ++r) c1[r][d] += rs[r];
    }
  }
}

template <int KH, int KW, int SM, typename scalar_t, typename acc>
inline void window_dispatch_nf(int nf, const scalar_t* const* P, scalar_t* o, int32_t* a, acc* const* c0,
                               acc* const* c1, acc scale, int64_t D) {
  if (nf == 0) window_pass<KH, KW, SM, 0>(P, o, a, c0, c1, scale, D);
  else if (nf == 1) window_pass<KH, KW, SM, 1>(P, o, a, c0, c1, scale, D);
  else window_pass<KH, KW, SM, 2>(P, o, a, c0, c1, scale, D);
}

template <typename scalar_t, int KH, int KW>
void fwd_window_impl(const at::Tensor& x, const Params& p, const Slots& sl, const scalar_t* sep,
                     at::Tensor& out, at::Tensor& argmax, bool need_argmax) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, W = p.W, H = p.H, SW = p.SW;
  const int64_t sT = x.stride(0), sH = x.stride(1), sW = x.stride(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  int32_t* ap = need_argmax ? argmax.data_ptr<int32_t>() : nullptr;
  std::vector<int64_t> cfirst, clast, rfirst, rlast;
  bin_table(W, p.fw, cfirst, clast);
  bin_table(H, p.fh, rfirst, rlast);
  // per window column: its columns' fast bins, if they agree (else -1: per-patch adds)
  std::vector<int64_t> wj0(SW, -1), wj1(SW, -1);
  for (int64_t sw = 0; sw < SW; ++sw) {
    bool same = true;
    for (int64_t c = 1; c < KW; ++c)
      same = same && cfirst[sw * KW + c] == cfirst[sw * KW] && clast[sw * KW + c] == clast[sw * KW];
    if (same) { wj0[sw] = cfirst[sw * KW]; wj1[sw] = clast[sw * KW]; }
  }
  std::vector<acc> inv_cnt(p.F);
  for (int64_t i = 0; i < p.fh; ++i)
    for (int64_t j = 0; j < p.fw; ++j)
      inv_cnt[i * p.fw + j] = acc(1) / acc((bin_end(i, H, p.fh) - bin_start(i, H, p.fh)) *
                                          (bin_end(j, W, p.fw) - bin_start(j, W, p.fw)));
  const acc inv_win = acc(1) / acc(KH * KW);
  const int slow_mode = p.is_max ? (ap != nullptr ? 3 : 2) : 1;

  // Frames claimed one at a time (common.h: parallel_dynamic); each writes its own rows.
  parallel_dynamic(p.T, 1, [&](auto& next) {
    std::vector<acc> colsum(KH * p.fw * D), facc(p.F * D);
    const scalar_t* P[KH * KW];
    acc* c0[KH] = {};
    acc* c1[KH] = {};
    for (int64_t t0, t1; next(t0, t1);)
    for (int64_t t = t0; t < t1; ++t) {
      const bool slow = sl.slow[t] >= 0, fast = sl.fast[t] >= 0;
      const int sm = slow ? slow_mode : 0;
      if (fast) std::fill(facc.begin(), facc.end(), acc(0));
      for (int64_t h0 = 0; h0 < H; h0 += KH) {
        if (fast) std::fill(colsum.begin(), colsum.end(), acc(0));
        for (int64_t sw = 0; sw < SW; ++sw) {
          for (int r = 0; r < KH; ++r)
            for (int c = 0; c < KW; ++c) P[r * KW + c] = xp + t * sT + (h0 + r) * sH + (sw * KW + c) * sW;
          const int64_t tok = (h0 / KH) * SW + sw;
          scalar_t* o = slow ? op + (sl.slow[t] + tok) * D : nullptr;
          int32_t* a = (sm == 3) ? ap + (sl.rank[t] * p.S + tok) * D : nullptr;
          int nf = 0;
          if (fast && wj0[sw] >= 0) {
            nf = wj1[sw] != wj0[sw] ? 2 : 1;
            for (int r = 0; r < KH; ++r) {
              c0[r] = colsum.data() + (r * p.fw + wj0[sw]) * D;
              c1[r] = colsum.data() + (r * p.fw + wj1[sw]) * D;
            }
          }
          switch (sm) {
            case 0: window_dispatch_nf<KH, KW, 0>(nf, P, o, a, c0, c1, inv_win, D); break;
            case 1: window_dispatch_nf<KH, KW, 1>(nf, P, o, a, c0, c1, inv_win, D); break;
            case 2: window_dispatch_nf<KH, KW, 2>(nf, P, o, a, c0, c1, inv_win, D); break;
            default: window_dispatch_nf<KH, KW, 3>(nf, P, o, a, c0, c1, inv_win, D); break;
          }
          if (fast && wj0[sw] < 0) {  // window straddles a bin edge: per-patch adds (cache hits)
            for (int r = 0; r < KH; ++r)
              for (int c = 0; c < KW; ++c) {
                const int64_t w = sw * KW + c;
                const scalar_t* __restrict__ xv = P[r * KW + c];
                acc* __restrict__ d0 = colsum.data() + (r * p.fw + cfirst[w]) * D;
                acc* __restrict__ d1 = colsum.data() + (r * p.fw + clast[w]) * D;
                if (clast[w] != cfirst[w]) {
#pragma omp simd
                  for (int64_t d = 0; d < D; ++d) { const acc v = acc(xv[d]); d0[d] += v; d1[d] += v; }
                } else {
#pragma omp simd
                  for (int64_t d = 0; d < D; ++d) d0[d] += acc(xv[d]);
                }
              }
          }
        }
        if (fast) {
          for (int r = 0; r < KH; ++r) {
            const int64_t h = h0 + r;
            const acc* __restrict__ cs = colsum.data() + r * p.fw * D;
            for (int64_t i = rfirst[h]; i <= rlast[h]; ++i) {
              acc* __restrict__ fr = facc.data() + i * p.fw * D;
#pragma omp simd
              for (int64_t e = 0; e < p.fw * D; ++e) fr[e] += cs[e];
            }
          }
        }
      }
      if (fast) {
        for (int64_t f = 0; f < p.F; ++f) {
          scalar_t* __restrict__ o = op + (sl.fast[t] + f) * D;
          const acc* __restrict__ src = facc.data() + f * D;
          const acc c = inv_cnt[f];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] = scalar_t(src[d] * c);
        }
      }
      if (sl.sep[t] >= 0) std::copy(sep, sep + D, op + sl.sep[t] * D);
    }
  });
}


std::tuple<at::Tensor, at::Tensor> slowfast_pool_cpu(const at::Tensor& x_in, const at::Tensor& slow_index,
                                                     const std::optional<at::Tensor>& separator,
                                                     at::IntArrayRef slow_kernel, c10::string_view slow_mode,
                                                     at::IntArrayRef fast_grid, c10::string_view fast_frames,
                                                     c10::string_view order, bool need_argmax) {
  TORCH_CHECK(x_in.dim() == 4, "slowfast_pool: x must be (T, H, W, D), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "slowfast_pool: x must be a CPU tensor here");
  const at::Tensor x = unit_last_stride(x_in);
  const bool has_sep = separator.has_value() && separator->defined();
  const Params p = make_params(x.size(0), x.size(1), x.size(2), x.size(3), slow_index.size(0), slow_kernel,
                               std::string_view(slow_mode.data(), slow_mode.size()), fast_grid,
                               std::string_view(fast_frames.data(), fast_frames.size()),
                               std::string_view(order.data(), order.size()), has_sep);
  const Slots sl = make_slots(p, slow_index);
  at::Tensor sep;
  if (has_sep) {
    TORCH_CHECK(separator->dim() == 1 && separator->size(0) == p.D, "slowfast_pool: separator must be (D,)");
    TORCH_CHECK(separator->scalar_type() == x.scalar_type(), "slowfast_pool: separator dtype must match x");
    sep = separator->contiguous();
  }
  at::Tensor out = at::empty({total_rows(p), p.D}, x.options());
  const bool want_arg = need_argmax && p.is_max;
  at::Tensor argmax = at::empty(want_arg ? std::vector<int64_t>{p.Ns * p.S, p.D} : std::vector<int64_t>{0},
                                x.options().dtype(at::kInt));
  advise_huge_pages(out);
  if (want_arg) advise_huge_pages(argmax);
  LVLM_DISPATCH_FLOATS(x.scalar_type(), "slowfast_pool_cpu", [&] {
    const scalar_t* sp = has_sep ? sep.data_ptr<scalar_t>() : nullptr;
    if (p.kh == 1 && p.kw == 2) {
      fwd_window_impl<scalar_t, 1, 2>(x, p, sl, sp, out, argmax, want_arg);
    } else if (p.kh == 2 && p.kw == 2) {
      fwd_window_impl<scalar_t, 2, 2>(x, p, sl, sp, out, argmax, want_arg);
    } else {
      fwd_impl<scalar_t>(x, p, sl, sp, out, argmax, want_arg);
    }
  });
  return {out, argmax};
}

// One input patch's gradient row: SM = 0 (not slow) / 1 (avg: even share) / 2 (max: only
// where the arg-max is this patch's window position k); NF = number of fast bins (0..2
// columns; rows are already folded into c0/c1). Written once, accumulated in acc.
template <int SM, int NF, typename scalar_t, typename acc>
inline void bwd_patch(scalar_t* __restrict__ o, const scalar_t* __restrict__ gs, const int32_t* __restrict__ a,
                      int32_t k, acc inv_win, const acc* __restrict__ c0, const acc* __restrict__ c1, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    acc v = acc(0);
    if constexpr (SM == 1) v += acc(gs[d]) * inv_win;
    if constexpr (SM == 2) v += a[d] == k ? acc(gs[d]) : acc(0);
    if constexpr (NF >= 1) v += c0[d];
    if constexpr (NF == 2) v += c1[d];
    o[d] = scalar_t(v);
  }
}

template <typename scalar_t>
void bwd_impl(const at::Tensor& g, const at::Tensor& argmax, const Params& p, const Slots& sl, at::Tensor& gx) {
  using acc = acc_t<scalar_t>;
  const int64_t D = p.D, W = p.W, H = p.H;
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const int32_t* ap = p.is_max ? argmax.data_ptr<int32_t>() : nullptr;
  scalar_t* xp = gx.data_ptr<scalar_t>();
  std::vector<int64_t> cfirst, clast, rfirst, rlast;
  bin_table(W, p.fw, cfirst, clast);
  bin_table(H, p.fh, rfirst, rlast);
  const acc inv_win = acc(1) / acc(p.kh * p.kw);

  at::parallel_for(0, p.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc> gf(p.F * D), grow(p.fw * D);
    for (int64_t t = t0; t < t1; ++t) {
      const bool slow = sl.slow[t] >= 0, fast = sl.fast[t] >= 0;
      if (fast) {  // fast grads scaled by 1 / bin size, once per frame
        for (int64_t i = 0; i < p.fh; ++i)
          for (int64_t j = 0; j < p.fw; ++j) {
            const acc c = acc(1) / acc((bin_end(i, H, p.fh) - bin_start(i, H, p.fh)) *
                                       (bin_end(j, W, p.fw) - bin_start(j, W, p.fw)));
            const scalar_t* src = gp + (sl.fast[t] + i * p.fw + j) * D;
            acc* dst = gf.data() + (i * p.fw + j) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] = acc(src[d]) * c;
          }
      }
      for (int64_t h = 0; h < H; ++h) {
        if (fast) {
          std::fill(grow.begin(), grow.end(), acc(0));
          for (int64_t i = rfirst[h]; i <= rlast[h]; ++i) {
            const acc* __restrict__ src = gf.data() + i * p.fw * D;
            acc* __restrict__ dst = grow.data();
#pragma omp simd
            for (int64_t e = 0; e < p.fw * D; ++e) dst[e] += src[e];
          }
        }
        const int64_t dh = h % p.kh;
        for (int64_t w = 0; w < W; ++w) {
          scalar_t* o = xp + ((t * H + h) * W + w) * D;
          const acc* c0 = grow.data() + cfirst[w] * D;
          const acc* c1 = grow.data() + clast[w] * D;
          const int nf = fast ? (clast[w] != cfirst[w] ? 2 : 1) : 0;
          const int sm = slow ? (p.is_max ? 2 : 1) : 0;
          const int64_t scol = (h / p.kh) * p.SW + w / p.kw;
          const scalar_t* gs = slow ? gp + (sl.slow[t] + scol) * D : nullptr;
          const int32_t* a = (sm == 2) ? ap + (sl.rank[t] * p.S + scol) * D : nullptr;
          const int32_t k = static_cast<int32_t>(dh * p.kw + w % p.kw);
          switch (sm * 3 + nf) {
            case 0: bwd_patch<0, 0>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 1: bwd_patch<0, 1>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 2: bwd_patch<0, 2>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 3: bwd_patch<1, 0>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 4: bwd_patch<1, 1>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 5: bwd_patch<1, 2>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 6: bwd_patch<2, 0>(o, gs, a, k, inv_win, c0, c1, D); break;
            case 7: bwd_patch<2, 1>(o, gs, a, k, inv_win, c0, c1, D); break;
            default: bwd_patch<2, 2>(o, gs, a, k, inv_win, c0, c1, D); break;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> slowfast_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& slow_index, at::IntArrayRef x_shape,
    bool has_separator, at::IntArrayRef slow_kernel, c10::string_view slow_mode, at::IntArrayRef fast_grid,
    c10::string_view fast_frames, c10::string_view order) {
  TORCH_CHECK(x_shape.size() == 4, "slowfast_pool_backward: x_shape must be (T, H, W, D)");
  const Params p = make_params(x_shape[0], x_shape[1], x_shape[2], x_shape[3], slow_index.size(0), slow_kernel,
                               std::string_view(slow_mode.data(), slow_mode.size()), fast_grid,
                               std::string_view(fast_frames.data(), fast_frames.size()),
                               std::string_view(order.data(), order.size()), has_separator);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == total_rows(p) && grad_out.size(1) == p.D,
              "slowfast_pool_backward: grad_out must be (", total_rows(p), ", ", p.D, "), got ", grad_out.sizes());
  if (p.is_max && p.Ns > 0) {
    TORCH_CHECK(argmax.scalar_type() == at::kInt && argmax.dim() == 2 && argmax.size(0) == p.Ns * p.S &&
                    argmax.size(1) == p.D,
                "slowfast_pool_backward: max mode needs argmax (Ns*S, D) int32 from the forward");
  }
  const Slots sl = make_slots(p, slow_index);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor am = p.is_max && p.Ns > 0 ? argmax.contiguous() : argmax;
  at::Tensor gx = at::empty({p.T, p.H, p.W, p.D}, g.options());
  advise_huge_pages(gx);
  LVLM_DISPATCH_FLOATS(g.scalar_type(), "slowfast_pool_backward_cpu", [&] { bwd_impl<scalar_t>(g, am, p, sl, gx); });
  at::Tensor gsep;
  if (has_separator) {
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < p.T; ++t)
      if (sl.sep[t] >= 0) rows.push_back(sl.sep[t]);
    const at::Tensor ridx = at::tensor(rows, g.options().dtype(at::kLong));
    const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    gsep = g.index_select(0, ridx).sum(0, false, acc_type).to(g.scalar_type());
  } else {
    gsep = at::empty({0}, g.options());
  }
  return {gx, gsep};
}

}  // namespace

LVLM_ISA_EXPORT(slowfast_pool, slowfast_pool_cpu)
LVLM_ISA_EXPORT(slowfast_pool_backward, slowfast_pool_backward_cpu)

}  // namespace LVLM_ISA
}  // namespace lvlm_fast

#if LVLM_ISA_REGISTER
LVLM_ISA_DECLARE(slowfast_pool)
LVLM_ISA_DECLARE(slowfast_pool_backward)
TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) {
  m.impl("slowfast_pool", LVLM_ISA_DISPATCH(slowfast_pool));
  m.impl("slowfast_pool_backward", LVLM_ISA_DISPATCH(slowfast_pool_backward));
}
#endif
