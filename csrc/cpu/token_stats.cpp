// token_stats on CPU: per row of x = logits / T, the log-sum-exp, the log-probability of the label,
// the entropy of softmax(x) and the mean log-probability over the vocabulary, in one streaming read
// of the row; and their gradient, in one read of the row and one write of the gradient row.
// Compiled once per CPU capability (see kernels.h).
#include <memory>
#include <optional>

#include "vec_utils.h"

namespace rlhf_fast::cpu::CPU_CAPABILITY {
namespace {

// Running sums of a row, all relative to the running max m:
//   s = sum_v exp(x_v - m),   t = sum_v exp(x_v - m) * (x_v - m),   sum_d = sum_v (x_v - m)  (over n columns)
// so lse = m + log s, H = lse - E[x] = log s - t / s and mean_v log p_v = sum_d / V - log s. Keeping
// t and sum_d relative to m (not sum e * x, sum x) avoids cancelling two numbers of the size of the logits
// when they are large: a sum of 1e4-sized logits in float32 is off by far more than the mean log-prob's 1e-5.
struct RowSums {
  float m = -kInf, s = 0.0f, t = 0.0f, sum_d = 0.0f;
  int64_t n = 0;  // columns in sum_d

  void add(const RowSums& chunk) {  // chunk sums taken against the same m
    s += chunk.s;
    t += chunk.t;
    sum_d += chunk.sum_d;
    n += chunk.n;
  }
  void raise_max(float new_m) {
    sum_d += (m - new_m) * static_cast<float>(n);  // m is finite here; n = 0 unless sum_d is kept
    if (s > 0.0f) {
      const float shift = m - new_m;
      const float scale = std::exp(shift);
      t = scale * (t + shift * s);
      s *= scale;
    }
    m = new_m;
  }
};

// Sums of one chunk against m (m finite), and in .m the chunk's own max of x. With kStore, also
// e = exp(x - m) into e[0, n + pad) in load2's order, zeros past n: the scratch of the fused pass.
// `next`: the same columns of the next row, prefetched meanwhile (prefetch_step).
template <typename T, bool kEntropy, bool kSumX, bool kStore, bool kScale>
RowSums chunk_sums_impl(const T* x, int64_t n, float inv_temp, float m, const T* next, float* e) {
  const Vec vinv(inv_temp), vm(m);
  Vec s0(0.0f), s1(0.0f), t0(0.0f), t1(0.0f), x0(0.0f), x1(0.0f), m0(-kInf), m1(-kInf);
  auto one = [&](const Vec& v, int64_t at, Vec& s, Vec& t, Vec& sd, Vec& mx) {
    const Vec xs = kScale ? v * vinv : v;
    mx = at::vec::clamp_min(xs, mx);
    const Vec d = xs - vm;
    if constexpr (kSumX) {
      sd += d;
    }
    const Vec ev = vexp_acc<kEntropy>(d, s, t);
    if constexpr (kStore) {
      ev.store(e + at);
    }
  };
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec a, b;
    load2(x + i, a, b);
    prefetch_step(next + i);
    one(a, i, s0, t0, x0, m0);
    one(b, i + kVec, s1, t1, x1, m1);
  }
  float tail_d = 0.0f;
  if (i < n) {
    // -inf pads the tail (exp = 0, max unchanged); the tail's own sum of x - m is taken apart.
    Vec a, b, unused(0.0f);
    load2_tail(x + i, n - i, -kInf, a, b);
    one(a, i, s0, t0, unused, m0);
    one(b, i + kVec, s1, t1, unused, m1);
    if constexpr (kSumX) {
      for (; i < n; ++i) tail_d += static_cast<float>(x[i]) * inv_temp - m;
    }
  }
  RowSums out;
  out.m = hmax(at::vec::maximum(m0, m1));
  out.s = hsum(s0 + s1);
  if constexpr (kEntropy) {
    out.t = hsum(t0 + t1);
  }
  if constexpr (kSumX) {
    out.sum_d = hsum(x0 + x1) + tail_d;
    out.n = n;
  }
  return out;
}

// At temperature 1 the scaling multiply is skipped (with_scale).
template <typename T, bool kEntropy, bool kSumX, bool kStore = false>
RowSums chunk_sums(const T* x, int64_t n, float inv_temp, float m, const T* next, float* e = nullptr) {
  RowSums out;
  with_scale(inv_temp, [&]<bool kScale>() {
    out = chunk_sums_impl<T, kEntropy, kSumX, kStore, kScale>(x, n, inv_temp, m, next, e);
  });
  return out;
}

template <typename T, bool kEntropy, bool kSumX>
RowSums row_sums(const T* x, int64_t V, float inv_temp, const T* next) {
  RowSums acc;
  for (int64_t c = 0; c < V; c += kChunk) {
    const int64_t n = std::min(kChunk, V - c);
    if (acc.m == -kInf) {
      // No finite max yet (first chunk, or all -inf so far): find one before any exp.
      const float raw_max = chunk_max(x + c, n);
      if (raw_max == -kInf) {
        if constexpr (kSumX) acc.sum_d = -kInf;  // a masked logit makes the mean log-prob -inf
        continue;
      }
      acc.m = raw_max * inv_temp;  // T > 0, and rounding is monotone: this is max(x)
    }
    RowSums chunk = chunk_sums<T, kEntropy, kSumX>(x + c, n, inv_temp, acc.m, next + c);
    if (chunk.m > acc.m + kHeadroom) {
      acc.raise_max(chunk.m);
      chunk = chunk_sums<T, kEntropy, kSumX>(x + c, n, inv_temp, acc.m, next + c);
    }
    acc.add(chunk);
    if (chunk.m > acc.m) {
      acc.raise_max(chunk.m);
    }
  }
  return acc;
}

template <typename T>
RowSums row_sums(const T* x, int64_t V, float inv_temp, const T* next, bool entropy, bool sum_d) {
  if (entropy) {
    return sum_d ? row_sums<T, true, true>(x, V, inv_temp, next) : row_sums<T, true, false>(x, V, inv_temp, next);
  }
  return sum_d ? row_sums<T, false, true>(x, V, inv_temp, next) : row_sums<T, false, false>(x, V, inv_temp, next);
}

// The statistics of one row that is not ignored (label: its label, or any index when there are none).
struct RowStats {
  double lse;      // m + log s, exact (see SplitLse)
  double entropy;  // log s - t / s, exact for its float parts: lse - entropy = m + t / s = E[x] (see RowGrads)
  float logp, mean_logp;
};

// mean_v log p_v = sum_d / V - log s. The float32 running sum of x - m overflows to -inf once sum_v |x_v - m|
// passes 3.4e38 (logits spread over 3e33 at V = 128256), every x_v finite. Such a row sums again in double,
// which cannot overflow on float32 inputs; a masked (-inf) logit still makes it -inf, a NaN one NaN. Costs
// nothing on rows whose sum is finite.
template <typename T>
float mean_logp_of(const T* x, int64_t V, float inv_temp, float m, float log_s, float sum_d) {
  if (std::isfinite(sum_d) || !std::isfinite(m)) {
    return sum_d / static_cast<float>(V) - log_s;
  }
  double sum = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    sum += static_cast<double>(static_cast<float>(x[v])) * inv_temp;
  }
  return static_cast<float>((sum / static_cast<double>(V) - m) - log_s);
}

// H = log s - t / s in double from its float parts, like lse = m + log s: the backward takes E[x] as
// lse - H, which is then m + t / s to double rounding, where a float32 H (and lse) would be off by
// their ulp, ~1e-6 at H ~ log V.
double entropy_of(float log_s, const RowSums& acc) {
  return static_cast<double>(log_s) - static_cast<double>(acc.t / acc.s);
}

template <typename T>
RowStats row_stats(const T* x, int64_t V, float inv_temp, int64_t label, const T* next, bool entropy,
                   bool mean_logp) {
  const RowSums acc = row_sums<T>(x, V, inv_temp, next, entropy, mean_logp);
  const float log_s = std::log(acc.s);
  RowStats st{};
  st.lse = static_cast<double>(acc.m) + log_s;
  // (x - m) - log s: never subtracts two large numbers.
  st.logp = (static_cast<float>(x[label]) * inv_temp - acc.m) - log_s;
  if (entropy) st.entropy = entropy_of(log_s, acc);
  if (mean_logp) st.mean_logp = mean_logp_of(x, V, inv_temp, acc.m, log_s, acc.sum_d);
  return st;
}

template <typename T>
void fwd_rows(const TokenStatsFwdArgs& args, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = args.labels ? args.labels[r] : 0;
    RowStats st{};  // ignored rows are never read: all outputs 0
    if (!args.labels || label != args.ignore_index) {
      st = row_stats<T>(row_ptr<T>(args.logits, r), args.logits.V, args.inv_temp, label,
                        next_row<T>(args.logits, r, end), args.entropy, args.mean_logp);
    }
    args.lse[r] = st.lse;
    if (args.logp) args.logp[r] = st.logp;
    if (args.entropy) args.entropy[r] = st.entropy;
    if (args.mean_logp) args.mean_logp[r] = st.mean_logp;
  }
}

// The per-row upstream gradients of g_lp * logp + g_H * H + g_u * mean_v log p_v; absent terms are
// off (the entropy term needs mu).
struct RowGrads {
  bool has_lp, has_h, has_u;
  float g_lp, g_h, g_u;
  double mu;  // E_p[x] = lse - H, the entropy term's centre
};

// With log p_v = x_v - lse and log p_v + H = x_v - mu, the gradient is
//   g_lp * (1[v == label] - p_v) - g_H * p_v * (x_v - mu) + g_u * (1/V - p_v),
// divided by T. Off the label that is p_v * (c0 + c1 * (x_v - mu)) + k with c0 = -(g_lp + g_u) / T,
// c1 = -g_H / T, k = g_u / (V T); the label element is rewritten in float afterwards (label_grad).
// The entropy factor is taken as x_v - mu, not log p_v + H: on a near-uniform row both of those are
// ~log V, and their float32 roundings (~5e-7) would be most of a factor of ~1e-3 (relative error 1e-3).
struct GradCoefs {
  float c0, c1, k, g_lp;
  double mu;
};

// The coefficients of a row that is a block of `vocab` columns (the mean term's 1/vocab), each through
// plain_nan (see to_bf16).
GradCoefs grad_coefs(const RowGrads& rg, float inv_temp, int64_t vocab) {
  const float g_lp = rg.has_lp ? rg.g_lp : 0.0f;
  const float g_h = rg.has_h ? rg.g_h : 0.0f;
  const float g_u = rg.has_u ? rg.g_u : 0.0f;
  return {plain_nan(-(g_lp + g_u) * inv_temp), plain_nan(-g_h * inv_temp),
          plain_nan(g_u * inv_temp / static_cast<float>(vocab)), g_lp, rg.has_h ? rg.mu : 0.0};
}

// Calls f.template operator()<kEntropy, kMean, kStream>() for a gradient row with coefficients c: the
// entropy and mean terms switch on only where their coefficient is nonzero. A row whose g_H is 0 (PPO's
// default entropy_coef = 0, where the entropy is still computed for its statistics) or whose g_u is 0 (cross
// entropy without label smoothing) takes the cheaper pass; c1 = 0 makes the entropy term exactly 0 (its factor
// is clamped, never -inf), and k = 0 adds nothing.
template <typename F>
inline void with_terms(const GradCoefs& c, bool stream, F&& f) {
  auto by_stream = [&]<bool kEntropy, bool kMean>() {
    if (stream) {
      f.template operator()<kEntropy, kMean, true>();
    } else {
      f.template operator()<kEntropy, kMean, false>();
    }
  };
  const bool entropy = c.c1 != 0.0f, mean = c.k != 0.0f;
  if (entropy) {
    mean ? by_stream.template operator()<true, true>() : by_stream.template operator()<true, false>();
  } else {
    mean ? by_stream.template operator()<false, true>() : by_stream.template operator()<false, false>();
  }
}

// The gradient at the label, from its log-probability, computed in float after the row is written. Its
// log-prob term is taken as g_lp (1 - p) / T = -g_lp expm1(log p) / T: both g_lp - g_lp p and a g_lp / T
// added to the rounded value cancel when p is close to 1 (a confident token), leaving only the rounding error.
// `label_x`: the label's scaled logit x, for the entropy factor x - mu.
float label_grad(const GradCoefs& c, float label_logp, float label_x, float inv_temp) {
  const float logp = std::max(label_logp, kLogFloor);
  const float c0_rest = c.c0 + c.g_lp * inv_temp;  // c0 without its log-prob part
  const float lp_term = -c.g_lp * inv_temp * std::expm1(logp);
  const float centred = c.c1 == 0.0f ? 0.0f : std::max(static_cast<float>(label_x - c.mu), kLogFloor);
  return lp_term + std::exp(logp) * (c0_rest + c.c1 * centred) + c.k;
}

// The row is taken against one float R: R = lse.hi, or with the entropy term R = float(mu), next to the
// logits that the factor x - mu compares. With l = x - R, log p = l - (lse - R) and x - mu = l - (mu - R),
// so p (c0 + c1 (x - mu)) = exp(l) (c0' + c1' l) with c0' = e^(R - lse) (c0 - c1 (mu - R)) and
// c1' = e^(R - lse) c1. l <= max x - mu <= H <= log V: exp(l) cannot overflow.
// With kStream, the step that starts at `plain_at` (the label's, rewritten afterwards) takes plain stores.
template <typename T, bool kEntropy, bool kMean, bool kStream = false>
void grad_row(const T* x, T* g, int64_t V, float inv_temp, SplitLse lse, GradCoefs c, const T* next,
              int64_t plain_at) {
  const float ref = kEntropy ? static_cast<float>(c.mu) : lse.hi;
  // in double, then rounded once: R - lse is up to log V, and rounding it to float first would put its ulp
  // (5e-7 at 10) into every p. With R = hi it is -lo, exactly (hi + lo is exact in double).
  const double ref_minus_lse = static_cast<double>(ref) - (static_cast<double>(lse.hi) + lse.lo);
  const float scale = static_cast<float>(std::exp(ref_minus_lse));
  const float off = kEntropy ? static_cast<float>(c.mu - static_cast<double>(ref)) : 0.0f;
  const Vec vinv(inv_temp), vref(plain_nan(ref)), vc0(plain_nan(scale * (c.c0 - c.c1 * off))),
      vc1(plain_nan(scale * c.c1)), vk(c.k), floor(kLogFloor);
  auto row = [&]<bool kScale>() {
    auto grad = [&](const Vec& v) {
      Vec l = (kScale ? v * vinv : v) - vref;
      Vec out;
      if constexpr (kEntropy) {
        l = at::vec::clamp_min(l, floor);  // p = 0 stays 0 instead of 0 * -inf
        out = vexp(l) * at::vec::fmadd(vc1, l, vc0);
      } else {
        out = vexp(l) * vc0;
      }
      if constexpr (kMean) {
        out = out + vk;
      }
      return out;
    };
    // Each step loads its elements before storing over them, so g may be x itself.
    int64_t i = 0;
    for (; i + kStep <= V; i += kStep) {
      Vec a, b;
      load2(x + i, a, b);
      prefetch_step(next + i);
      store2_step<kStream>(g + i, grad(a), grad(b), i == plain_at);
    }
    if (i < V) {
      Vec a, b;
      load2_tail(x + i, V - i, -kInf, a, b);
      store2_tail(g + i, V - i, grad(a), grad(b));
    }
  };
  with_scale(inv_temp, row);
}

// Writes the gradient row of a row that is not ignored; g may be x itself. With `stream` (g a separate
// buffer that passes stream_aligned()), the row is written with non-temporal stores, except the step that
// holds the label: that step's lines take plain stores, so the label element rewritten after them needs no
// fence (a streamed line could land after a later plain store to it); the task ends with one stream_fence().
// The row may be a block of `V` columns out of `vocab` (the mean term's 1/vocab); `label` is then the
// label's column in the block, or -1 when it lies outside. `next`: the row to prefetch meanwhile (prefetch_step; the
// row itself when there is none).
template <typename T>
void write_grad_row(const T* x, T* g, int64_t V, int64_t vocab, float inv_temp, SplitLse lse, int64_t label,
                    float label_logp, const RowGrads& rg, const T* next, bool stream = false) {
  const GradCoefs c = grad_coefs(rg, inv_temp, vocab);
  const bool has_label = rg.has_lp && label >= 0;
  const int64_t plain_at = has_label ? label / kStep * kStep : -1;
  const float label_x = has_label ? static_cast<float>(x[label]) * inv_temp : 0.0f;  // before g overwrites x
  with_terms(c, stream, [&]<bool kEntropy, bool kMean, bool kStream>() {
    grad_row<T, kEntropy, kMean, kStream>(x, g, V, inv_temp, lse, c, next, plain_at);
  });
  if (has_label) {
    g[label] = static_cast<T>(label_grad(c, label_logp, label_x, inv_temp));
  }
}

// Also the second pass of the fused-linear forms' vocabulary-outer weight gradient: the rows are then
// columns [col0, col0 + V) of rows of `vocab` logits, with lse (and H) known from the first pass.
template <typename T>
void bwd_rows(const TokenStatsBwdArgs& args, int64_t begin, int64_t end) {
  const int64_t V = args.logits.V;
  T* grad = static_cast<T*>(args.grad);
  for (int64_t r = begin; r < end; ++r) {
    T* g = grad + r * V;
    const int64_t label = args.labels ? args.labels[r] : 0;
    const int64_t col = label - args.col0;  // the label's column in this block
    if (args.labels && label == args.ignore_index) {
      std::memset(static_cast<void*>(g), 0, V * sizeof(T));  // zero bits are +0 in all three dtypes
      continue;
    }
    const T* x = row_ptr<T>(args.logits, r);
    const RowGrads rg{args.grad_logp != nullptr,
                      args.grad_entropy != nullptr,
                      args.grad_mean_logp != nullptr,
                      args.grad_logp ? args.grad_logp[r] : 0.0f,
                      args.grad_entropy ? args.grad_entropy[r] : 0.0f,
                      args.grad_mean_logp ? args.grad_mean_logp[r] : 0.0f,
                      args.grad_entropy ? args.lse[r] - args.entropy[r] : 0.0};
    const bool in_block = col >= 0 && col < V;
    const SplitLse lse = split_lse(args.lse[r]);
    const float label_logp =
        rg.has_lp && in_block ? (static_cast<float>(x[col]) * args.inv_temp - lse.hi) - lse.lo : 0.0f;
    write_grad_row<T>(x, g, V, args.vocab, args.inv_temp, lse, in_block ? col : -1, label_logp, rg,
                      next_row<T>(args.logits, r, end), stream_grad(g, x));
  }
  stream_fence();  // the streamed rows are in memory before the caller reads them
}

// d loss / d logp and d loss / d H of the PPO per-token loss, times the token weight w:
//   pg = max(-A * ratio, -A * clip(ratio, lo, hi)), ratio = exp(logp - old_logp); with dual clip c
//   and A < 0, pg = min(pg, -A * c); plus kl_coef * k(logp, ref_logp) and - entropy_coef * H.
// The same formulas as rlhf_fast._torch_backend._ppo_coefs.
void ppo_coefs(const PpoParams& pp, float logp, float old_logp, float adv, float ref_logp, float w, float& g_lp,
               float& g_h) {
  // An advantage of 0 (a GRPO group with equal rewards) gives no pg gradient whatever the ratio; ratio 1
  // keeps an overflowing exp from making -0 * inf = NaN.
  const float ratio = adv == 0.0f ? 1.0f : std::exp(logp - old_logp);
  const float unclipped = -adv * ratio;
  const float clipped = -adv * std::clamp(ratio, pp.ratio_low, pp.ratio_high);
  // The clipped branch is flat in logp; a NaN advantage takes the other one and gives NaN, as in autograd.
  float d = unclipped < clipped ? 0.0f : -adv * ratio;
  if (pp.dual_clip > 0.0f && adv < 0.0f && std::max(unclipped, clipped) > -adv * pp.dual_clip) {
    d = 0.0f;  // capped at -A * c: flat as well
  }
  if (pp.kl_coef != 0.0f) {
    const float d_kl = pp.kl_kind == 1 ? 1.0f : pp.kl_kind == 2 ? logp - ref_logp : -std::expm1(ref_logp - logp);
    d += pp.kl_coef * d_kl;
  }
  g_lp = w * d;
  g_h = -w * pp.entropy_coef;
}

// The row's upstream gradients in token_stats_fused, from its statistics.
void fused_coefs(const TokenStatsFusedArgs& args, int64_t r, const RowStats& st, RowGrads& rg) {
  rg = RowGrads{true, args.entropy != nullptr, false, 0.0f, 0.0f, 0.0f, args.entropy ? st.lse - st.entropy : 0.0};
  if (args.mode == 0) {
    rg.g_lp = args.coefs[r];
    rg.g_h = args.coefs[args.n + r];
    rg.g_u = args.coefs[2 * args.n + r];
    rg.has_u = true;
  } else {
    ppo_coefs(args.ppo, st.logp, args.coefs[r], args.coefs[args.n + r], args.coefs[2 * args.n + r],
              args.coefs[3 * args.n + r], rg.g_lp, rg.g_h);
  }
}

// Rows up to this many elements take the scratch path of fused_rows: the row (up to 256 KiB as float32)
// and its float32 scratch (512 KiB) stay in a core's L2 between the two passes.
constexpr int64_t kScratchMaxV = int64_t{1} << 17;
// float32 rows take it too where vector arithmetic is the bound rather than memory: on AVX2 (measured on a
// Zen 1 EPYC, which splits 256-bit ops in two) the second exp costs more than the scratch's cache traffic,
// even at V = 128256 where row and scratch (1 MiB) leave its 512 KiB L2: fused cross entropy 2.1 -> 1.3-1.5
// ns per element and core at V = 32000 and 128256.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kScratchFloat = true;
#else
constexpr bool kScratchFloat = false;
#endif

// A task's scratch for one row, in load2's order (padded for the last step): e_v = exp(d_v) with
// d_v = x_v - m_c and m_c the running max when v's chunk was summed, and m_c per chunk.
struct Scratch {
  std::unique_ptr<float[]> e, chunk_m;
  explicit Scratch(int64_t V) : e(new float[V + kStep]), chunk_m(new float[V / kChunk + 1]) {}
};

// row_sums for the scratch path, which also keeps e and each chunk's m.
// False if some logit is +inf or NaN: the caller then takes the streaming path.
template <typename T, bool kEntropy, bool kSumX>
bool scratch_sums(const T* x, int64_t V, float inv_temp, const T* next, Scratch& sc, RowSums& acc) {
  acc = RowSums{};
  for (int64_t c = 0, k = 0; c < V; c += kChunk, ++k) {
    const int64_t n = std::min(kChunk, V - c);
    float* e = sc.e.get() + c;
    if (acc.m == -kInf) {
      // No finite max yet (first chunk, or all -inf so far): find one before any exp.
      const float raw_max = chunk_max(x + c, n);
      if (raw_max == -kInf) {  // all masked: p = 0 (the gradient pass scales the chunk by 0)
        sc.chunk_m[k] = -kInf;
        std::fill(e, e + n, 0.0f);
        if constexpr (kSumX) acc.sum_d = -kInf;
        continue;
      }
      acc.m = raw_max * inv_temp;
    }
    RowSums chunk = chunk_sums<T, kEntropy, kSumX, true>(x + c, n, inv_temp, acc.m, next + c, e);
    if (!(chunk.m < kInf)) return false;  // +inf or NaN
    if (chunk.m > acc.m + kHeadroom) {
      acc.raise_max(chunk.m);
      chunk = chunk_sums<T, kEntropy, kSumX, true>(x + c, n, inv_temp, acc.m, next + c, e);
    }
    sc.chunk_m[k] = acc.m;
    acc.add(chunk);
    if (chunk.m > acc.m) {
      acc.raise_max(chunk.m);
    }
  }
  return true;
}

// The gradient row from the scratch. With q_c = (m_c - m) - log s = m_c - lse, p_v = e_v exp(q_c) and
// x_v - mu = d_v - (mu - m_c), so p_v (c0 + c1 (x_v - mu)) + k = e_v (a_c + b_c d_v) + k with
// a_c = exp(q_c) (c0 - c1 (mu - m_c)) and b_c = exp(q_c) c1 (both 0 when exp(q_c) is: a chunk whose p are
// all below float range, or all masked, with q_c = -inf and e = 0). d_v is formed again from the row, in
// cache since the first pass, only when the entropy term needs it (clamped at kLogFloor: e = 0 there,
// and 0 * -inf would be NaN).
template <typename T, bool kEntropy, bool kMean, bool kStream>
void scratch_grad_row(const T* x, const Scratch& sc, T* g, int64_t V, float inv_temp, float m, float log_s,
                      GradCoefs c, int64_t plain_at) {
  const Vec vinv(inv_temp), vk(c.k), floor(kLogFloor);
  with_scale(inv_temp, [&]<bool kScale>() {
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kChunk, ++k) {
      const int64_t n = std::min(kChunk, V - c0);
      const float m_c = sc.chunk_m[k];
      const float q = (m_c - m) - log_s;
      const float scale = std::exp(q);
      const Vec va(scale == 0.0f ? 0.0f : scale * (c.c0 - c.c1 * static_cast<float>(c.mu - m_c)));
      const Vec vb(scale == 0.0f ? 0.0f : scale * c.c1);
      const Vec vm_c(m_c == -kInf ? 0.0f : m_c);
      const float* e = sc.e.get() + c0;
      auto grad = [&](const Vec& v, int64_t at) {
        Vec out;
        if constexpr (kEntropy) {
          const Vec d = at::vec::clamp_min((kScale ? v * vinv : v) - vm_c, floor);
          out = Vec::loadu(e + at) * at::vec::fmadd(vb, d, va);
        } else {
          out = Vec::loadu(e + at) * va;
        }
        if constexpr (kMean) {
          out = out + vk;
        }
        return out;
      };
      const T* xc = x + c0;
      T* gc = g + c0;
      int64_t i = 0;
      for (; i + kStep <= n; i += kStep) {
        Vec a(0.0f), b(0.0f);
        if constexpr (kEntropy) {
          load2(xc + i, a, b);  // before the store: g may be x itself
        }
        store2_step<kStream>(gc + i, grad(a, i), grad(b, i + kVec), c0 + i == plain_at);
      }
      if (i < n) {
        Vec a(0.0f), b(0.0f);
        if constexpr (kEntropy) {
          load2_tail(xc + i, n - i, -kInf, a, b);
        }
        store2_tail(gc + i, n - i, grad(a, i), grad(b, i + kVec));
      }
    }
  });
}

// The statistics and gradient row of a row that is not ignored, with one exp per element: a pass that
// reads the row from memory chunk by chunk (max, then e = exp(x - max) into the scratch, with the sums)
// and a pass that writes the gradient from the scratch. False, with nothing written, if a logit is
// +inf or NaN or all are -inf: the caller then takes the streaming path, which handles those.
template <typename T>
bool scratch_row(const TokenStatsFusedArgs& args, int64_t r, const T* x, T* g, const T* next, Scratch& sc,
                 RowStats& st, RowGrads& rg) {
  const int64_t V = args.logits.V;
  const int64_t label = args.labels[r];
  const float inv_temp = args.inv_temp;
  const bool entropy = args.entropy != nullptr, mean_logp = args.mean_logp != nullptr;
  RowSums acc;
  bool ok;
  if (entropy) {
    ok = mean_logp ? scratch_sums<T, true, true>(x, V, inv_temp, next, sc, acc)
                   : scratch_sums<T, true, false>(x, V, inv_temp, next, sc, acc);
  } else {
    ok = mean_logp ? scratch_sums<T, false, true>(x, V, inv_temp, next, sc, acc)
                   : scratch_sums<T, false, false>(x, V, inv_temp, next, sc, acc);
  }
  if (!ok || acc.m == -kInf) return false;
  const float m = acc.m, log_s = std::log(acc.s);
  const float label_x = static_cast<float>(x[label]) * inv_temp;  // read before the gradient may overwrite x
  st.lse = static_cast<double>(m) + log_s;
  st.logp = (label_x - m) - log_s;
  if (entropy) st.entropy = entropy_of(log_s, acc);
  if (mean_logp) st.mean_logp = mean_logp_of(x, V, inv_temp, m, log_s, acc.sum_d);
  fused_coefs(args, r, st, rg);

  const GradCoefs c = grad_coefs(rg, inv_temp, V);
  const int64_t plain_at = label / kStep * kStep;  // the label's step takes plain stores (see write_grad_row)
  with_terms(c, stream_grad(g, x), [&]<bool kEntropy, bool kMean, bool kStream>() {
    scratch_grad_row<T, kEntropy, kMean, kStream>(x, sc, g, V, inv_temp, m, log_s, c, plain_at);
  });
  g[label] = static_cast<T>(label_grad(c, st.logp, label_x, inv_temp));
  return true;
}

template <typename T>
void fused_rows(const TokenStatsFusedArgs& args, int64_t begin, int64_t end) {
  const int64_t V = args.logits.V;
  // One scratch row per task (a task is one thread's share of rows), padded for the last step.
  // float32 rows keep the streaming path where they are bound by memory traffic, not by the second exp
  // (AVX-512 machines); see kScratchFloat.
  std::optional<Scratch> scratch;
  if ((sizeof(T) == 2 || kScratchFloat) && V <= kScratchMaxV) {
    scratch.emplace(V);
  }
  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = args.labels[r];
    const T* x = row_ptr<T>(args.logits, r);
    const int64_t a = r / args.logits.B;
    T* g = static_cast<T*>(args.grad) + a * args.grad_stride0 + (r - a * args.logits.B) * args.grad_stride1;
    RowStats st{};
    if (label == args.ignore_index) {
      std::memset(static_cast<void*>(g), 0, V * sizeof(T));  // ignored rows are never read
    } else {
      RowGrads rg{};
      const T* next = next_row<T>(args.logits, r, end);
      if (!scratch || !scratch_row<T>(args, r, x, g, next, *scratch, st, rg)) {
        // One read for the statistics; the gradient pass re-reads the row from cache.
        st = row_stats<T>(x, V, args.inv_temp, label, next, args.entropy, args.mean_logp);
        fused_coefs(args, r, st, rg);
        write_grad_row<T>(x, g, V, V, args.inv_temp, split_lse(st.lse), label, st.logp, rg, next,
                          stream_grad(g, x));
      }
    }
    args.lse[r] = st.lse;
    args.logp[r] = st.logp;
    if (args.entropy) args.entropy[r] = st.entropy;
    if (args.mean_logp) args.mean_logp[r] = st.mean_logp;
  }
  stream_fence();  // the streamed rows are in memory before the caller reads them
}

}  // namespace

void token_stats_fwd(const TokenStatsFwdArgs& args, int64_t begin, int64_t end) {
  dispatch_dtype(args.logits.dtype, [&]<typename T>() { fwd_rows<T>(args, begin, end); });
}

void token_stats_bwd(const TokenStatsBwdArgs& args, int64_t begin, int64_t end) {
  dispatch_dtype(args.logits.dtype, [&]<typename T>() { bwd_rows<T>(args, begin, end); });
}

void token_stats_fused(const TokenStatsFusedArgs& args, int64_t begin, int64_t end) {
  dispatch_dtype(args.logits.dtype, [&]<typename T>() { fused_rows<T>(args, begin, end); });
}

}  // namespace rlhf_fast::cpu::CPU_CAPABILITY
