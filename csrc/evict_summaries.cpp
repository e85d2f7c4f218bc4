// evict_summaries (CPU): move a window's summary K/V rows to sit after the retained ones,
// in place, re-rotating each key by its RoPE position delta (HF rotate_half convention).
//
// Summary m: source row src + first + m*stride, destination dst + m (dst <= src + first,
// so every destination is at or before its source). One task per (batch, head); inside
// it the rows go in increasing m, each source row read completely (into a local fp32
// buffer) before its destination is written, which makes overlapping source/destination
// ranges (ratio 1, 2) safe. cos/sin of delta_m * inv_freq are computed once per m (fp32
// angles, like HF's rotary embedding) and shared by every (batch, head).
#include "common.h"

#include <vector>

namespace lvlm_fast {
namespace {

using at::Tensor;

template <typename T>
void evict_impl(Tensor& key, Tensor& value, const std::vector<float>& cs, int64_t src,
                int64_t first, int64_t stride, int64_t count, int64_t dst) {
  using A = acc_t<T>;
  const int64_t B = key.size(0), H = key.size(1), D = key.size(3), half = D / 2;
  T* kp = key.data_ptr<T>();
  T* vp = value.data_ptr<T>();
  const int64_t ksb = key.stride(0), ksh = key.stride(1), ksn = key.stride(2);
  const int64_t vsb = value.stride(0), vsh = value.stride(1), vsn = value.stride(2);
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<A> row(D);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      T* kb = kp + b * ksb + h * ksh;
      T* vb = vp + b * vsb + h * vsh;
      for (int64_t m = 0; m < count; ++m) {
        const int64_t s = src + first + m * stride, d = dst + m;
        const float* c = cs.data() + m * 2 * half;
        const float* sn = c + half;
        const T* ks = kb + s * ksn;
        for (int64_t i = 0; i < D; ++i) row[i] = static_cast<A>(ks[i]);
        T* kd = kb + d * ksn;
        for (int64_t i = 0; i < half; ++i) {
          const A x1 = row[i], x2 = row[i + half];
          kd[i] = static_cast<T>(x1 * c[i] - x2 * sn[i]);
          kd[i + half] = static_cast<T>(x2 * c[i] + x1 * sn[i]);
        }
        if (s != d) {
          const T* vs = vb + s * vsn;
          T* vd = vb + d * vsn;
          for (int64_t i = 0; i < D; ++i) vd[i] = vs[i];  // vd < vs: forward copy is safe
        }
      }
    }
  });
}

void evict_summaries_cpu(Tensor key, Tensor value, const Tensor& inv_freq, int64_t src,
                         int64_t first, int64_t stride, int64_t count, int64_t dst,
                         int64_t pos_delta) {
  TORCH_CHECK(key.dim() == 4 && key.sizes() == value.sizes(),
              "evict_summaries: key and value must be (B, H, C, D) of one shape");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "evict_summaries: dtype mismatch");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1,
              "evict_summaries: last dim must be unit-stride");
  const int64_t D = key.size(3), C = key.size(2);
  TORCH_CHECK(D % 2 == 0, "evict_summaries: head dim must be even");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == D / 2,
              "evict_summaries: inv_freq must be (D/2,)");
  TORCH_CHECK(stride >= 1 && first >= 0 && count >= 0 && src >= 0 && dst >= 0,
              "evict_summaries: bad layout arguments");
  if (count == 0) return;
  TORCH_CHECK(src + first + (count - 1) * stride < C, "evict_summaries: source rows past capacity");
  TORCH_CHECK(dst <= src + first, "evict_summaries: dst must be <= src + first (race-free move)");
  const int64_t half = D / 2;
  Tensor f = inv_freq.to(at::kFloat).contiguous();
  const float* fp = f.data_ptr<float>();
  std::vector<float> cs(static_cast<size_t>(count * 2 * half));
  for (int64_t m = 0; m < count; ++m) {
    const float delta = static_cast<float>((dst + m) - (src + first + m * stride) + pos_delta);
    for (int64_t i = 0; i < half; ++i) {
      const float ang = delta * fp[i];
      cs[m * 2 * half + i] = std::cos(ang);
      cs[m * 2 * half + half + i] = std::sin(ang);
    }
  }
  LVLM_DISPATCH_FLOATS(key.scalar_type(), "evict_summaries", [&] {
    evict_impl<scalar_t>(key, value, cs, src, first, stride, count, dst);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) { m.impl("evict_summaries", &evict_summaries_cpu); }

}  // namespace lvlm_fast
