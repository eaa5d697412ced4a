// kl_div on CPU: exact KL(P || Q) over the whole vocabulary per row, P = softmax(p_logits / T),
// Q = softmax(q_logits / T), in one streaming read of both rows; and its gradient to either input,
// in one more read and one write per requested gradient. Compiled once per CPU capability.
#include "vec_utils.h"

namespace rlhf_fast::cpu::CPU_CAPABILITY {
namespace {

// With x = p_logits / T, y = q_logits / T and running maxes mx, my:
//   sx = sum exp(x - mx),  sy = sum exp(y - my),  t = sum exp(x - mx) * ((x - mx) - (y - my))  (0 where P = 0)
//   KL = t / sx - log sx + log sy.
// t takes each side against its own max: x - y would round to float32's ulp at the logits' magnitude
// (1e-3 at |x| = 1e4) before the (mx - my) that cancels it is taken off, while x - mx is exact next to the max.
struct KlSums {
  float mx = -kInf, my = -kInf, sx = 0.0f, sy = 0.0f, t = 0.0f;

  void add(const KlSums& chunk) {  // chunk sums taken against the same maxes
    sx += chunk.sx;
    sy += chunk.sy;
    t += chunk.t;
  }
  // t against the new maxes: exp(mx - new_mx) * (t - ((new_mx - mx) - (new_my - my)) * sx). Until P has mass
  // (sx = 0, then mx may be -inf) t is 0 and stays so; a my of -inf here means t is already +inf (P > 0 where
  // Q = 0), and the shift keeps it so.
  void raise_max(float new_mx, float new_my) {
    const float dx = new_mx > mx ? new_mx - mx : 0.0f;
    const float dy = new_my > my ? new_my - my : 0.0f;
    if (sx > 0.0f && dx != dy) {
      t -= (dx - dy) * sx;
    }
    if (new_mx > mx) {
      if (sx > 0.0f) {
        const float scale = std::exp(mx - new_mx);
        sx *= scale;
        t *= scale;
      }
      mx = new_mx;
    }
    if (new_my > my) {
      if (sy > 0.0f) sy *= std::exp(my - new_my);
      my = new_my;
    }
  }
};

// Runs f(i, count, a0, a1, b0, b1) over x[0, n) and y[0, n) together, a step of each at a time (count elements
// from i: kStep, or fewer in the tail, which -inf pads), prefetching the same columns of the next rows nx, ny.
template <typename T, typename F>
void for_each_pair_step(const T* x, const T* y, int64_t n, const T* nx, const T* ny, F&& f) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec a0, a1, b0, b1;
    load2(x + i, a0, a1);
    load2(y + i, b0, b1);
    prefetch_step(nx + i);
    prefetch_step(ny + i);
    f(i, kStep, a0, a1, b0, b1);
  }
  if (i < n) {
    Vec a0, a1, b0, b1;
    load2_tail(x + i, n - i, -kInf, a0, a1);
    load2_tail(y + i, n - i, -kInf, b0, b1);
    f(i, n - i, a0, a1, b0, b1);
  }
}

// Sums of one chunk against mx, my, and in .mx/.my the chunk's own maxes; the same columns of the
// next rows, nx and ny, are prefetched meanwhile (prefetch_step).
template <typename T, bool kScale>
KlSums chunk_sums(const T* x, const T* y, int64_t n, float inv_temp, float mx, float my, const T* nx, const T* ny) {
  // A side that has seen only -inf so far has max -inf; shifting by 0 then gives exp(-inf) = 0,
  // where -inf - (-inf) would give NaN.
  const Vec vinv(inv_temp), vmx(mx > -kInf ? mx : 0.0f), vmy(my > -kInf ? my : 0.0f);
  Vec sx(0.0f), sy(0.0f), t(0.0f), cmx(-kInf), cmy(-kInf);
  auto one = [&](const Vec& a, const Vec& b) {
    const Vec xs = kScale ? a * vinv : a;
    const Vec ys = kScale ? b * vinv : b;
    cmx = at::vec::clamp_min(xs, cmx);
    cmy = at::vec::clamp_min(ys, cmy);
    // P = 0 contributes 0 to t (x = -inf would give 0 * -inf); P > 0 with y = -inf gives +inf.
    const Vec dx = xs - vmx, dy = ys - vmy;
    vexp_acc_times(dx, dx - dy, sx, t);
    sy += vexp(dy);
  };
  auto step = [&](int64_t, int64_t, const Vec& a0, const Vec& a1, const Vec& b0, const Vec& b1) {
    one(a0, b0);
    one(a1, b1);
  };
  for_each_pair_step(x, y, n, nx, ny, step);
  KlSums out;
  out.mx = hmax(cmx);
  out.my = hmax(cmy);
  out.sx = hsum(sx);
  out.sy = hsum(sy);
  out.t = hsum(t);
  return out;
}

template <typename T>
KlSums kl_sums(const T* x, const T* y, int64_t V, float inv_temp, const T* nx, const T* ny) {
  KlSums acc;
  with_scale(inv_temp, [&]<bool kScale>() {
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      // Until a side has a finite max, find one before any exp (see token_stats.cpp).
      if (acc.mx == -kInf) acc.mx = chunk_max(x + c, n) * inv_temp;
      if (acc.my == -kInf) acc.my = chunk_max(y + c, n) * inv_temp;
      KlSums chunk = chunk_sums<T, kScale>(x + c, y + c, n, inv_temp, acc.mx, acc.my, nx + c, ny + c);
      if (chunk.mx > acc.mx + kHeadroom || chunk.my > acc.my + kHeadroom) {
        acc.raise_max(chunk.mx, chunk.my);
        chunk = chunk_sums<T, kScale>(x + c, y + c, n, inv_temp, acc.mx, acc.my, nx + c, ny + c);
      }
      acc.add(chunk);
      acc.raise_max(chunk.mx, chunk.my);
    }
  });
  return acc;
}

template <typename T>
void fwd_rows(const KlFwdArgs& args, int64_t begin, int64_t end) {
  const int64_t V = args.p.V;
  for (int64_t r = begin; r < end; ++r) {
    const KlSums acc = kl_sums(row_ptr<T>(args.p, r), row_ptr<T>(args.q, r), V, args.inv_temp,
                               next_row<T>(args.p, r, end), next_row<T>(args.q, r, end));
    const float log_sx = std::log(acc.sx);
    const float log_sy = std::log(acc.sy);
    args.lse_p[r] = static_cast<double>(acc.mx) + log_sx;  // double: see SplitLse
    args.lse_q[r] = static_cast<double>(acc.my) + log_sy;
    args.kl[r] = acc.t / acc.sx - (log_sx - log_sy);
  }
}

// grad_x = g * P * (log P - log Q - KL) / T  (0 where P = 0),   grad_y = g * (Q - P) / T.
// Each side is taken against a float R inside its row's logits (Centred): u = x - R is as exact as x - max, next
// to 1e4-sized logits and on near-uniform rows alike; P = exp(u) e^-rest with e^-rest in the row's coefficient,
// and log P - log Q - KL = (u_x - u_y) - (rest_x - rest_y + KL), the constant from double. Against float(lse)
// (SplitLse's hi), u_x and u_y are both ~-log V on a near-uniform row, and their roundings (~5e-7) were most
// of a difference of ~1e-3: a relative error of 3e-4.
// kStream: the gradient rows are written with non-temporal stores (both pass stream_aligned()).
struct Centred {
  float ref;    // float(lse - log V), between the row's mean and max logit; lse itself when that is not finite
  double rest;  // lse - ref (~log V), 0 when lse is not finite
};

inline Centred centred(double lse, double log_v) {
  const float ref = static_cast<float>(lse - log_v);
  if (!std::isfinite(ref)) return {static_cast<float>(lse), 0.0};
  return {ref, lse - static_cast<double>(ref)};
}

template <typename T, bool kNeedP, bool kNeedQ, bool kStream>
void bwd_row(const T* x, const T* y, T* gx, T* gy, int64_t V, float inv_temp, Centred cx, Centred cy, float kl,
             float g, const T* nx, const T* ny) {
  // u <= max - ref <= log V: exp(u) cannot overflow. The scalars through plain_nan (see to_bf16).
  const float gt = g * inv_temp;
  const Vec vinv(inv_temp), neg_ref_x(-plain_nan(cx.ref)), neg_ref_y(-plain_nan(cy.ref)),
      coef_x(plain_nan(gt * static_cast<float>(std::exp(-cx.rest)))),
      coef_y(plain_nan(gt * static_cast<float>(std::exp(-cy.rest)))),
      centre(plain_nan(static_cast<float>((cx.rest - cy.rest) + kl)));
  const Vec zero(0.0f);
  with_scale(inv_temp, [&]<bool kScale>() {
    auto grads = [&](const Vec& a, const Vec& b, Vec& out_x, Vec& out_y) {
      const Vec u_x = (kScale ? a * vinv : a) + neg_ref_x;
      const Vec u_y = (kScale ? b * vinv : b) + neg_ref_y;
      const Vec e_x = vexp(u_x);
      if constexpr (kNeedP) {
        out_x = Vec::blendv(coef_x * e_x * ((u_x - u_y) - centre), zero, e_x == zero);  // a NaN P stays NaN
      }
      if constexpr (kNeedQ) {
        out_y = coef_y * vexp(u_y) - coef_x * e_x;
      }
    };
    auto write = [&](int64_t i, int64_t n, const Vec& a0, const Vec& a1, const Vec& b0, const Vec& b1) {
      Vec x0, x1, y0, y1;
      grads(a0, b0, x0, y0);
      grads(a1, b1, x1, y1);
      if (n == kStep) {
        if constexpr (kNeedP) store2_step<kStream>(gx + i, x0, x1);
        if constexpr (kNeedQ) store2_step<kStream>(gy + i, y0, y1);
      } else {
        if constexpr (kNeedP) store2_tail(gx + i, n, x0, x1);
        if constexpr (kNeedQ) store2_tail(gy + i, n, y0, y1);
      }
    };
    for_each_pair_step(x, y, V, nx, ny, write);
  });
}

template <typename T, bool kNeedP, bool kNeedQ>
void bwd_rows(const KlBwdArgs& args, int64_t begin, int64_t end) {
  const int64_t V = args.p.V;
  T* gx = static_cast<T*>(args.grad_p);
  T* gy = static_cast<T*>(args.grad_q);
  const double log_v = std::log(static_cast<double>(V));
  for (int64_t r = begin; r < end; ++r) {
    T* gx_r = kNeedP ? gx + r * V : nullptr;
    T* gy_r = kNeedQ ? gy + r * V : nullptr;
    auto row = [&]<bool kStream>() {
      bwd_row<T, kNeedP, kNeedQ, kStream>(row_ptr<T>(args.p, r), row_ptr<T>(args.q, r), gx_r, gy_r, V, args.inv_temp,
                                          centred(args.lse_p[r], log_v), centred(args.lse_q[r], log_v), args.kl[r],
                                          args.grad_kl[r], next_row<T>(args.p, r, end), next_row<T>(args.q, r, end));
    };
    // Fresh gradient buffers, written once: streamed out when their rows are aligned (as in token_stats).
    if ((!kNeedP || stream_aligned(gx_r)) && (!kNeedQ || stream_aligned(gy_r))) {
      row.template operator()<true>();  // the tail's plain stores share no line with the streamed steps
    } else {
      row.template operator()<false>();
    }
  }
  stream_fence();  // the streamed rows are in memory before the caller reads them
}

}  // namespace

void kl_fwd(const KlFwdArgs& args, int64_t begin, int64_t end) {
  dispatch_dtype(args.p.dtype, [&]<typename T>() { fwd_rows<T>(args, begin, end); });
}

void kl_bwd(const KlBwdArgs& args, int64_t begin, int64_t end) {
  dispatch_dtype(args.p.dtype, [&]<typename T>() {
    if (args.grad_p && args.grad_q) {
      bwd_rows<T, true, true>(args, begin, end);
    } else if (args.grad_p) {
      bwd_rows<T, true, false>(args, begin, end);
    } else if (args.grad_q) {
      bwd_rows<T, false, true>(args, begin, end);
    }
  });
}

}  // namespace rlhf_fast::cpu::CPU_CAPABILITY
