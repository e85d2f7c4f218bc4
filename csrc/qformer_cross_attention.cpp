// qformer_cross_attention (CPU): Video-LLaMA Q-Former cross-attention of Lq fixed queries
// over T frames x S tokens, with the K/V projection and the per-frame position row fused.
//
// Tiling: the frames are walked in chunks of `ct` frames (ct * S * B ~ kChunkKeys keys), so
// the live working set is one chunk's X = F + p (keys x E), its K/V (keys x C) and its
// scores (B*H x Lq x keys), whatever T is: memory is constant in T and no (T*S, C) K/V or
// (Lq, T*S) score matrix exists. Every product is a GEMM on a tile (at::addmm / at::bmm,
// i.e. BLAS), never a scalar loop. Softmax is online across chunks (running max m, sum l,
// unnormalised output o, rescaled by exp(m_old - m_new)); accumulation is fp32 (fp64 for
// fp64 inputs); the output is cast to q's dtype at the end. lse = m + log(l), natural log.
//
// Backward recomputes each chunk's K, V and P = exp(scale * q.K - lse) from the saved lse
// (flash-style, nothing of size T*S*C saved), with delta = rowsum(dO * O) - dlse:
//   dV = P^T dO, dS = P * (dO V^T - delta), dq += scale dS K, dK = scale dS^T q,
//   dX = dK Wk + dV Wv, dWk += dK^T X, dbk += sum dK (same for v), dF = dX, dp[t] = sum_s dX.
#include "common.h"

namespace lvlm_fast {
namespace {

using at::Tensor;

constexpr int64_t kChunkKeys = 4096;

void check_inputs(const Tensor& q, const Tensor& f, const Tensor& pos, const Tensor& wk,
                  const Tensor& bk, const Tensor& wv, const Tensor& bv, int64_t H) {
  TORCH_CHECK(q.dim() == 3 && f.dim() == 4 && pos.dim() == 2,
              "qformer_cross_attention: q (B, Lq, C), frames (B, T, S, E), pos (T, E)");
  const int64_t C = q.size(2), E = f.size(3);
  TORCH_CHECK(f.size(0) == q.size(0), "qformer_cross_attention: frames batch != q batch");
  TORCH_CHECK(pos.size(0) == f.size(1) && pos.size(1) == E,
              "qformer_cross_attention: pos must be (T, E)");
  TORCH_CHECK(wk.dim() == 2 && wk.size(0) == C && wk.size(1) == E && wv.sizes() == wk.sizes(),
              "qformer_cross_attention: wk, wv must be (C, E)");
  TORCH_CHECK(bk.dim() == 1 && bk.size(0) == C && bv.sizes() == bk.sizes(),
              "qformer_cross_attention: bk, bv must be (C,)");
  TORCH_CHECK(H >= 1 && C % H == 0, "qformer_cross_attention: num_heads must divide C");
  for (const Tensor* t : {&f, &pos, &wk, &bk, &wv, &bv}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "qformer_cross_attention: all inputs must share q's dtype");
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "qformer_cross_attention: float inputs only");
}

at::ScalarType acc_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t chunk_frames(int64_t B, int64_t S) {
  return std::max<int64_t>(1, kChunkKeys / std::max<int64_t>(1, B * S));
}

// X = F[:, t0:t0+c] + p[t0:t0+c] as (B*c*S, E) in the accumulation dtype.
Tensor chunk_x(const Tensor& f, const Tensor& pos, int64_t t0, int64_t c, at::ScalarType acc) {
  Tensor x = f.narrow(1, t0, c).to(acc) + pos.narrow(0, t0, c).to(acc).unsqueeze(1);
  return x.reshape({-1, f.size(3)});
}

// (B*n, C) -> (B*H, n, Dh), heads split out of the channel dim.
Tensor heads(const Tensor& t, int64_t B, int64_t H) {
  const int64_t n = t.size(0) / B, Dh = t.size(1) / H;
  return t.view({B, n, H, Dh}).permute({0, 2, 1, 3}).reshape({B * H, n, Dh});
}

Tensor unheads(const Tensor& t, int64_t B, int64_t H) {
  const int64_t n = t.size(1), Dh = t.size(2);
  return t.view({B, H, n, Dh}).permute({0, 2, 1, 3}).reshape({B * n, H * Dh});
}

std::tuple<Tensor, Tensor> qformer_cross_attention_cpu(const Tensor& q, const Tensor& f,
                                                       const Tensor& pos, const Tensor& wk,
                                                       const Tensor& bk, const Tensor& wv,
                                                       const Tensor& bv, int64_t H,
                                                       double scale) {
  check_inputs(q, f, pos, wk, bk, wv, bv, H);
  const int64_t B = q.size(0), L = q.size(1), C = q.size(2), T = f.size(1), S = f.size(2);
  const auto acc = acc_type(q);
  const Tensor wkT = wk.to(acc).t(), wvT = wv.to(acc).t();
  const Tensor bkA = bk.to(acc), bvA = bv.to(acc);
  // q is pre-scaled once: scores = (scale q) . K.
  const Tensor qh = heads(q.to(acc).reshape({B * L, C}), B, H) * scale;  // not in place: may alias q
  Tensor m = at::full({B * H, L, 1}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(acc));
  Tensor l = at::zeros({B * H, L, 1}, q.options().dtype(acc));
  Tensor o = at::zeros({B * H, L, C / H}, q.options().dtype(acc));
  const int64_t ct = chunk_frames(B, S);
  for (int64_t t0 = 0; t0 < T; t0 += ct) {
    const int64_t c = std::min(ct, T - t0);
    const Tensor x = chunk_x(f, pos, t0, c, acc);             // (B*c*S, E)
    const Tensor kh = heads(at::addmm(bkA, x, wkT), B, H);     // (BH, c*S, Dh)
    const Tensor vh = heads(at::addmm(bvA, x, wvT), B, H);
    Tensor s = at::bmm(qh, kh.transpose(1, 2));                 // (BH, L, c*S)
    const Tensor mn = at::maximum(m, std::get<0>(s.max(2, true)));
    s.sub_(mn).exp_();
    const Tensor alpha = (m - mn).exp_();
    l.mul_(alpha).add_(s.sum(2, true));
    o.mul_(alpha).add_(at::bmm(s, vh));
    m = mn;
  }
  o.div_(l);
  Tensor lse = (m + l.log()).view({B, H, L});
  Tensor out = unheads(o, B, H).view({B, L, C}).to(q.scalar_type());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
qformer_cross_attention_backward_cpu(const Tensor& grad_out, const std::optional<Tensor>& grad_lse,
                                     const Tensor& q, const Tensor& f, const Tensor& pos,
                                     const Tensor& wk, const Tensor& bk, const Tensor& wv,
                                     const Tensor& bv, const Tensor& out, const Tensor& lse,
                                     int64_t H, double scale) {
  check_inputs(q, f, pos, wk, bk, wv, bv, H);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "qformer_cross_attention_backward: grad_out and out must have q's shape");
  const int64_t B = q.size(0), L = q.size(1), C = q.size(2), T = f.size(1), S = f.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == L,
              "qformer_cross_attention_backward: lse must be (B, H, Lq)");
  const auto acc = acc_type(q);
  const Tensor wkA = wk.to(acc), wvA = wv.to(acc);
  const Tensor wkT = wkA.t(), wvT = wvA.t();
  const Tensor bkA = bk.to(acc), bvA = bv.to(acc);
  const Tensor qh = heads(q.to(acc).reshape({B * L, C}), B, H);            // (BH, L, Dh)
  const Tensor goh = heads(grad_out.to(acc).reshape({B * L, C}), B, H);
  const Tensor oh = heads(out.to(acc).reshape({B * L, C}), B, H);
  Tensor delta = (goh * oh).sum(2, true);                                   // (BH, L, 1)
  if (grad_lse.has_value() && grad_lse->defined()) {
    delta = delta - grad_lse->to(acc).reshape({B * H, L, 1});
  }
  const Tensor lseh = lse.to(acc).reshape({B * H, L, 1});
  const Tensor qs = qh * scale;
  Tensor dq = at::zeros_like(qh);
  Tensor dwk = at::zeros(wk.sizes(), q.options().dtype(acc));
  Tensor dwv = at::zeros(wv.sizes(), q.options().dtype(acc));
  Tensor dbk = at::zeros(bk.sizes(), q.options().dtype(acc));
  Tensor dbv = at::zeros(bv.sizes(), q.options().dtype(acc));
  Tensor df = at::empty(f.sizes(), f.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dpos = at::empty(pos.sizes(), pos.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t ct = chunk_frames(B, S);
  for (int64_t t0 = 0; t0 < T; t0 += ct) {
    const int64_t c = std::min(ct, T - t0);
    const Tensor x = chunk_x(f, pos, t0, c, acc);
    const Tensor kh = heads(at::addmm(bkA, x, wkT), B, H);
    const Tensor vh = heads(at::addmm(bvA, x, wvT), B, H);
    const Tensor p = at::bmm(qs, kh.transpose(1, 2)).sub_(lseh).exp_();  // (BH, L, n)
    const Tensor dvh = at::bmm(p.transpose(1, 2), goh);                   // (BH, n, Dh)
    const Tensor ds = at::bmm(goh, vh.transpose(1, 2)).sub_(delta).mul_(p);
    dq.add_(at::bmm(ds, kh));
    const Tensor dk = unheads(at::bmm(ds.transpose(1, 2), qs), B, H);    // (B*n, C)
    const Tensor dv = unheads(dvh, B, H);
    const Tensor dx = at::addmm(at::mm(dk, wkA), dv, wvA);                // (B*n, E)
    dwk.addmm_(dk.t(), x);
    dwv.addmm_(dv.t(), x);
    dbk.add_(dk.sum(0));
    dbv.add_(dv.sum(0));
    const Tensor dx4 = dx.view({B, c, S, f.size(3)});
    df.narrow(1, t0, c).copy_(dx4);
    dpos.narrow(0, t0, c).copy_(dx4.sum({0, 2}));
  }
  dq.mul_(scale);
  Tensor dqo = unheads(dq, B, H).view({B, L, C}).to(q.scalar_type());
  return {dqo, df, dpos, dwk.to(wk.scalar_type()), dbk.to(bk.scalar_type()),
          dwv.to(wv.scalar_type()), dbv.to(bv.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lvlm_fast, CPU, m) {
  m.impl("qformer_cross_attention", &qformer_cross_attention_cpu);
  m.impl("qformer_cross_attention_backward", &qformer_cross_attention_backward_cpu);
}

}  // namespace lvlm_fast
