// summary_attention (CPU): Video-XL window attention over [sink; summaries; window].
//
// Query i of the Lq-row window sees key j iff j <= P + i with P = S - Lq. So the keys split
// into a part every query sees ([0, P)) and a square causal part ([P, S)) where the usual
// top-left causal rule is the bottom-right one. Each part goes through torch's fused flash
// SDPA for CPU (blocked GEMMs, online softmax, fp32 accumulation) on *views* of the cache:
// grouped-query attention is expressed by viewing query heads as (Hkv, G) and expanding
// each KV head with stride 0 over its G query heads, so the cache is never concatenated,
// repeated or copied. The two partial results are merged exactly with their log-sum-exps.
// The backward runs the flash backward of each part with the *merged* output and lse,
// which gives the exact partial gradients (P is recomputed from the merged lse).
// key_mass recomputes the scores in key chunks (bounded memory) with the final lse.
#include "common.h"
#include <algorithm>

#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>

namespace lvlm_fast {
namespace {

using at::Tensor;

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "summary_attention: q, k, v must be 4-D (B, H, L, Dh)");
  TORCH_CHECK(k.sizes() == v.sizes(), "summary_attention: v must have k's shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "summary_attention: k must be (B, Hkv, S, Dh) with q's B and Dh");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "summary_attention: KV heads must divide query heads");
  TORCH_CHECK(k.size(2) >= q.size(2) && q.size(2) >= 1,
              "summary_attention: need S >= Lq >= 1");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "summary_attention: q, k, v must share a dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "summary_attention: float inputs only");
}

at::ScalarType acc_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Merges the two flash results of one batch row into the op's outputs in ONE pass:
//   lse = logaddexp(l1, l2),  out = o1 exp(l1 - lse) + o2 exp(l2 - lse)
// (o1/l1: the memory part, absent when P == 0; o2/l2: the causal window part), written
// straight into out[b] (a (Hq, L, D) view of the (L, Hq, D) output) and lse[b]. The flash
// outputs are (Hkv, G, L, D) views of (Hkv, L, G, D) buffers and are read through their
// strides. Done as separate ATen ops (logaddexp, two exp, two broadcast products, a sum, a
// reshape copy, two copy_) this was ~10 extra passes and parallel regions: 1.2-1.4x the
// time of the two flash calls alone on a loaded 2-core machine. Arithmetic in acc_t, with
// torch's logaddexp formula, so results match the former ATen composition.
template <typename scalar_t>
void merge_parts(const Tensor* o1, const Tensor* l1, const Tensor& o2, const Tensor& l2, Tensor& out_b,
                 Tensor& lse_b, int64_t G) {
  using acc = acc_t<scalar_t>;
  const int64_t Hq = out_b.size(0), L = out_b.size(1), D = out_b.size(2);
  const scalar_t* p1 = o1 ? o1->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* p2 = o2.const_data_ptr<scalar_t>();
  const acc* m1 = l1 ? l1->const_data_ptr<acc>() : nullptr;
  const acc* m2 = l2.const_data_ptr<acc>();
  // element strides of (Hkv, G, L, D) outputs and (Hkv, G, L) lse
  const int64_t a0 = o1 ? o1->stride(0) : 0, a1 = o1 ? o1->stride(1) : 0, a2 = o1 ? o1->stride(2) : 0;
  const int64_t b0 = o2.stride(0), b1 = o2.stride(1), b2 = o2.stride(2);
  const int64_t la0 = l1 ? l1->stride(0) : 0, la1 = l1 ? l1->stride(1) : 0, la2 = l1 ? l1->stride(2) : 0;
  const int64_t lb0 = l2.stride(0), lb1 = l2.stride(1), lb2 = l2.stride(2);
  scalar_t* po = out_b.data_ptr<scalar_t>();
  acc* pl = lse_b.data_ptr<acc>();
  const int64_t os0 = out_b.stride(0), os1 = out_b.stride(1), ls0 = lse_b.stride(0), ls1 = lse_b.stride(1);
  // Threads only for >= 32 MB of traffic per chunk: below that one core finishes in about
  // a millisecond, less than a parallel region can cost on a shared machine.
  const int64_t row_bytes = Hq * D * static_cast<int64_t>(sizeof(scalar_t)) * (o1 ? 3 : 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 20) / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, L, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // query row i: out[i, :, :] is contiguous (Hq, D)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hk = h / G, g = h % G;
        const scalar_t* y2 = p2 + hk * b0 + g * b1 + i * b2;
        scalar_t* o = po + h * os0 + i * os1;
        const acc e2 = m2[hk * lb0 + g * lb1 + i * lb2];
        if (!o1) {
          for (int64_t d = 0; d < D; ++d) o[d] = y2[d];
          pl[h * ls0 + i * ls1] = e2;
          continue;
        }
        const scalar_t* y1 = p1 + hk * a0 + g * a1 + i * a2;
        const acc e1 = m1[hk * la0 + g * la1 + i * la2];
        acc lm;
        if (std::isinf(e1) && e1 == e2) {
          lm = e1;
        } else {
          const acc mx = std::max(e1, e2);
          lm = mx + std::log1p(std::exp(-std::abs(e1 - e2)));
        }
        const acc w1 = std::exp(e1 - lm), w2 = std::exp(e2 - lm);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d)
          o[d] = static_cast<scalar_t>(static_cast<acc>(y1[d]) * w1 + static_cast<acc>(y2[d]) * w2);
        pl[h * ls0 + i * ls1] = lm;
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> summary_attention_cpu(const Tensor& q_in, const Tensor& k_in,
                                                         const Tensor& v_in, double scale,
                                                         bool return_key_mass) {
  check_inputs(q_in, k_in, v_in);
  const Tensor q = unit_last_stride(q_in);
  const Tensor k = unit_last_stride(k_in);
  const Tensor v = unit_last_stride(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv, P = S - L;
  const auto acc = acc_type(q);

  Tensor out = at::empty({B, L, Hq, D}, q.options()).transpose(1, 2);
  Tensor lse = at::empty({B, Hq, L}, q.options().dtype(acc));
  Tensor mass = return_key_mass ? at::zeros({B, S}, q.options().dtype(at::kFloat))
                                : at::empty({0}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    Tensor qb = q[b].reshape({Hkv, G, L, D});  // may copy q (small), never k/v
    Tensor kb = k[b].unsqueeze(1).expand({Hkv, G, S, D});
    Tensor vb = v[b].unsqueeze(1).expand({Hkv, G, S, D});
    auto causal = at::_scaled_dot_product_flash_attention_for_cpu(
        qb, kb.narrow(2, P, L), vb.narrow(2, P, L), 0.0, true, std::nullopt, scale);
    const Tensor o2 = std::get<0>(causal);
    const Tensor l2 = std::get<1>(causal).to(acc);
    Tensor out_b = out[b], lse_b = lse[b];
    if (P > 0) {
      auto full = at::_scaled_dot_product_flash_attention_for_cpu(
          qb, kb.narrow(2, 0, P), vb.narrow(2, 0, P), 0.0, false, std::nullopt, scale);
      const Tensor o1 = std::get<0>(full);
      const Tensor l1 = std::get<1>(full).to(acc);
      LVLM_DISPATCH_FLOATS(q.scalar_type(), "summary_attention_merge", [&] {
        merge_parts<scalar_t>(&o1, &l1, o2, l2, out_b, lse_b, G);
      });
    } else {
      LVLM_DISPATCH_FLOATS(q.scalar_type(), "summary_attention_merge", [&] {
        merge_parts<scalar_t>(nullptr, nullptr, o2, l2, out_b, lse_b, G);
      });
    }
    if (return_key_mass) {
      const Tensor l = lse_b.reshape({Hkv, G, L});
      // Scores again, a chunk of keys at a time: bounded (Hq * L * chunk) memory.
      const int64_t chunk = std::max<int64_t>(16, (int64_t(1) << 22) / std::max<int64_t>(1, Hq * L));
      Tensor qf = qb.reshape({Hkv, G * L, D}).to(acc);
      Tensor lf = l.reshape({Hkv, G * L, 1});
      Tensor rows = at::arange(L, q.options().dtype(at::kLong)).unsqueeze(1);  // (L, 1)
      for (int64_t j0 = 0; j0 < S; j0 += chunk) {
        const int64_t c = std::min(chunk, S - j0);
        Tensor kc = k[b].narrow(1, j0, c).to(acc);                     // (Hkv, c, D)
        Tensor p = at::bmm(qf, kc.transpose(1, 2)).mul_(scale).sub_(lf).exp_();  // (Hkv, G*L, c)
        if (j0 + c > P) {
          Tensor cols = at::arange(j0, j0 + c, q.options().dtype(at::kLong)).unsqueeze(0);
          Tensor hidden = cols > (rows + P);                             // (L, c)
          p = p.view({Hkv, G, L, c}).masked_fill_(hidden, 0.0);
        }
        mass[b].narrow(0, j0, c).copy_(p.reshape({Hkv * G * L, c}).sum(0));
      }
    }
  }
  return {out, lse, mass};
}

std::tuple<Tensor, Tensor, Tensor> summary_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out, const Tensor& lse, double scale) {
  check_inputs(q_in, k_in, v_in);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
              "summary_attention_backward: grad_out and out must have q's shape");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q_in.size(0) && lse.size(1) == q_in.size(1) &&
                  lse.size(2) == q_in.size(2),
              "summary_attention_backward: lse must be (B, Hq, Lq)");
  const Tensor q = unit_last_stride(q_in);
  const Tensor k = unit_last_stride(k_in);
  const Tensor v = unit_last_stride(v_in);
  const Tensor go = unit_last_stride(grad_out.to(q.scalar_type()));
  const Tensor o = unit_last_stride(out);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv, P = S - L;
  const auto acc = acc_type(q);
  // The flash kernel wants its own lse dtype (fp32, fp64 for fp64).
  const Tensor lse_k = lse.to(acc);

  Tensor dq = at::empty({B, Hq, L, D}, q.options());
  Tensor dk = at::empty({B, Hkv, S, D}, k.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dv = at::empty({B, Hkv, S, D}, v.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t b = 0; b < B; ++b) {
    Tensor qb = q[b].reshape({Hkv, G, L, D});
    Tensor kb = k[b].unsqueeze(1).expand({Hkv, G, S, D});
    Tensor vb = v[b].unsqueeze(1).expand({Hkv, G, S, D});
    Tensor gob = go[b].reshape({Hkv, G, L, D});
    Tensor ob = o[b].reshape({Hkv, G, L, D});
    Tensor lb = lse_k[b].reshape({Hkv, G, L});
    auto g2 = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        gob, qb, kb.narrow(2, P, L), vb.narrow(2, P, L), ob, lb, 0.0, true, std::nullopt, scale);
    Tensor dqb = std::get<0>(g2).to(acc);
    dk[b].narrow(1, P, L).copy_(std::get<1>(g2).to(acc).sum(1));
    dv[b].narrow(1, P, L).copy_(std::get<2>(g2).to(acc).sum(1));
    if (P > 0) {
      auto g1 = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          gob, qb, kb.narrow(2, 0, P), vb.narrow(2, 0, P), ob, lb, 0.0, false, std::nullopt,
          scale);
      dqb = dqb + std::get<0>(g1).to(acc);
      dk[b].narrow(1, 0, P).copy_(std::get<1>(g1).to(acc).sum(1));
      dv[b].narrow(1, 0, P).copy_(std::get<2>(g1).to(acc).sum(1));
    }
    dq[b].copy_(dqb.reshape({Hq, L, D}));
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) {
  m.impl("summary_attention", &summary_attention_cpu);
  m.impl("summary_attention_backward", &summary_attention_backward_cpu);
}

}  // namespace lvlm_fast
