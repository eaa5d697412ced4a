// Vector helpers shared by the row kernels. Include only from a per-capability source: everything
// here lives in namespace rlhf_fast::cpu::CPU_CAPABILITY, so the AVX-512 copy of an inline helper
// can never be the one the linker keeps for the DEFAULT kernels.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"

#ifndef CPU_CAPABILITY
#error "compile the CPU kernels with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512|AVX512_BF16 (see setup.py)"
#endif

namespace rlhf_fast::cpu::CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Loops take two vectors per step: bf16/fp16 load and store in pairs, and two accumulators
// hide the add latency.
constexpr int64_t kStep = 2 * kVec;
// Forward passes walk a row in chunks of kChunk elements, each one streaming pass that sums
// exp(x - m) against the running max m and finds the chunk's own max; sums are rescaled (one
// scalar exp) only when the max grows. A chunk may exceed m by up to kHeadroom without any
// exp overflowing (e^64 * 2048 is far below FLT_MAX); past that it is summed again (rare: it
// needs a jump of 64 nats above everything before it in the row).
constexpr int64_t kChunk = 2048;
constexpr float kHeadroom = 64.0f;
static_assert(kChunk % kStep == 0);

// Every kernel forms x = logits * (1/T) with a plain rounded multiply and is compiled with
// -ffp-contract=off (setup.py), so that multiply is never fused into x - m. Forward and backward
// then see the same float x: x - m and x - hi (SplitLse) next to the max are exact differences of
// the very floats the forward summed.

constexpr float kInf = std::numeric_limits<float>::infinity();
// vexp is exactly 0 below -87.3, so clamping a log-probability at -200 changes no p, but keeps
// p * log p at 0 * -200 = 0 for masked (-inf) logits instead of 0 * -inf = NaN.
constexpr float kLogFloor = -200.0f;

// exp(d) for the arguments softmax needs, d = x - max or x - lse (<= 0 up to rounding). Results
// below exp(-87.3), the smallest normal float, are flushed to exactly 0: masked -inf logits get
// p = 0, and no denormal slows down the adds after it. d = n ln2 + r with |r| <= ln2/2, then a
// degree-5 polynomial fitted here for relative error: 1.7e-7 (3 ulp) in float32, plus n * 2e-9
// from the one-constant ln2, which only shows on the p < e^-20 that barely count.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kExpFlush = -87.33654f;  // log(FLT_MIN)
constexpr float kExpC1 = 0.9999997020f, kExpC2 = 0.4999915063f, kExpC3 = 0.1666763574f,
                kExpC4 = 0.04189793020f, kExpC5 = 0.008290314116f;

#if defined(CPU_CAPABILITY_AVX512)
// vexp, and in `keep` the lanes it did not flush to 0 (NaN lanes included).
inline __m512 vexp_keep(const __m512 d, __mmask16& keep) {
  // Lanes below the flush point (and -inf, whose r would be NaN) give 0; NaN stays NaN.
  keep = _mm512_cmp_ps_mask(d, _mm512_set1_ps(kExpFlush), _CMP_NLT_UQ);
  // n = round(d log2 e) by the 1.5 * 2^23 shift: exact for |d log2 e| < 2^22, which covers every d
  // whose result is neither flushed nor +inf; one fma and one add where a round instruction is two uops.
  const __m512 shift = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(kLog2e), shift), shift);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), d);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC5), r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);  // p * 2^n; overflows to +inf for d > 88.7
}
inline Vec vexp(const Vec& d) {
  __mmask16 keep;
  return vexp_keep(d, keep);
}
// e = exp(d), with s += e and t += e * w, taking 0 for e * w wherever e is 0; the product is fused into t.
inline Vec vexp_acc_times(const Vec& d, const Vec& w, Vec& s, Vec& t) {
  __mmask16 keep;
  const __m512 e = vexp_keep(d, keep);
  s = _mm512_add_ps(s, e);
  t = _mm512_mask3_fmadd_ps(e, w, t, keep);
  return e;
}
// e = exp(d), with s += e and, with kDot, t += e * d (0 wherever e is 0: a -inf logit adds 0 to an
// entropy sum, not NaN).
template <bool kDot>
inline Vec vexp_acc(const Vec& d, Vec& s, Vec& t) {
  if constexpr (kDot) {
    return vexp_acc_times(d, d, s, t);
  }
  const Vec e = vexp(d);
  s += e;
  return e;
}
#elif defined(CPU_CAPABILITY_AVX2)
// For d <= 88 and NaN (+inf gives NaN): a larger d overflows 2^n's exponent field into garbage. No caller
// clamps (a min costs 5-8% of a float32 pass here): a gradient pass's d is a log-probability, <= 0 up to
// rounding, and a sum pass's is x minus a running max that a chunk may exceed by at most kHeadroom before it
// is summed again, so only sums that are thrown away see garbage.
inline Vec vexp(const Vec& d) {
  // Lanes below the flush point (and -inf, whose r is NaN) are zeroed by the final and; NaN stays NaN.
  const __m256 keep = _mm256_cmp_ps(d, _mm256_set1_ps(kExpFlush), _CMP_NLT_UQ);
  // t = d log2 e + 1.5 * 2^23 + 127 rounds d log2 e to the nearest integer n in the low mantissa bits, so
  // n + 127 shifted into the exponent field is 2^n (the 2^22 bit above it shifts out), and t minus the
  // constant is n: no round or convert instruction (each two uops on 128-bit units).
  const __m256 shift = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  const __m256 t = _mm256_fmadd_ps(d, _mm256_set1_ps(kLog2e), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), d);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // For a kept lane n is in [-126, 127]; a flushed lane's bits here are garbage that the and removes.
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
#else
inline Vec vexp(const Vec& d) {
  return d.exp();  // scalar std::exp per lane
}
#endif

#if !defined(CPU_CAPABILITY_AVX512)
// e = exp(d), with s += e and, with kDot, t += e * d, taking 0 for e * d wherever e is 0 (a -inf logit
// adds 0 to an entropy sum, not NaN): d is clamped at kLogFloor first, which changes no e.
template <bool kDot>
inline Vec vexp_acc(const Vec& d, Vec& s, Vec& t) {
  const Vec dc = kDot ? at::vec::clamp_min(d, Vec(kLogFloor)) : d;
  const Vec e = vexp(dc);
  s += e;
  if constexpr (kDot) {
    t = at::vec::fmadd(e, dc, t);
  }
  return e;
}
inline Vec vexp_acc_times(const Vec& d, const Vec& w, Vec& s, Vec& t) {
  const Vec e = vexp(d), zero(0.0f);
  s += e;
  t = at::vec::fmadd(e, Vec::blendv(zero, w, e > zero), t);
  return e;
}
#endif

// Calls f.template operator()<kScale>() with kScale false at temperature 1, where a pass skips the multiply by
// 1/T (x * 1 is x exactly): one vector op of the dozen or so per element that arithmetic-bound passes take.
template <typename F>
inline void with_scale(float inv_temp, F&& f) {
  if (inv_temp == 1.0f) {
    f.template operator()<false>();
  } else {
    f.template operator()<true>();
  }
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Two vectors of float from kStep logits, upcast in registers (no float32 copy of the row).
//
// On AVX-512 and AVX2, a bfloat16 step is loaded *permuted*: one load of a full register, the even
// elements widened into a (a shift) and the odd ones into b (a mask), two instructions where widening in
// order takes five (AVX-512) or four and a lane extract (AVX2).
// store2 of a bfloat16 step takes its vectors in that same order, so a step loaded with load2, worked
// on lane by lane and stored with store2 lands in place; a pass that only reduces the row (sums, max)
// never sees the order; float32 scratch written from such a step (the fused pass's exp) stays permuted
// and must be read back with the same step boundaries. Tails (load2_tail, store2_tail) are in order.
// Every other dtype and capability loads in order (float16 too: F16C converts in order).
inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kVec);
}
#if defined(CPU_CAPABILITY_AVX512)
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  const __m512i v = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
#else
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  at::vec::load_fp32_from_bf16(p, a, b);
}
#endif
inline void load2(const c10::Half* p, Vec& a, Vec& b) {
  at::vec::load_fp32_from_fp16(p, a, b);
}

// The last n < kStep elements of a row; the lanes past n hold `fill`.
template <typename T>
inline void load2_tail(const T* p, int64_t n, float fill, Vec& a, Vec& b) {
  float buf[kStep];
  for (int64_t i = 0; i < kStep; ++i) {
    buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  }
  a = Vec::loadu(buf);
  b = Vec::loadu(buf + kVec);
}

// v, or the default quiet NaN if v is any NaN: a per-row scalar of a gradient pass, so that every NaN the
// pass can make has zero low 16 bits (see to_bf16 on AVX2).
inline float plain_nan(float v) {
  return std::isnan(v) ? std::numeric_limits<float>::quiet_NaN() : v;
}

// A row's log-sum-exp as two floats, lse = hi + lo. The forward passes keep lse in double: m + log s rounded
// to float32 next to a large max m loses log s to m's ulp (1e-3 at m = 1e4), and every p = exp(x - lse) of the
// backward would carry that error. x - hi is exact next to the max (both floats of one magnitude); lo, the
// part float32 cannot hold, is at most half an ulp of hi and is folded into a row's scalars. A non-finite
// lse (a NaN or all-masked row) keeps lo = 0 so that it goes on as the float it is.
struct SplitLse {
  float hi, lo;
};

inline SplitLse split_lse(double lse) {
  const float hi = static_cast<float>(lse);
  return {hi, std::isfinite(hi) ? static_cast<float>(lse - static_cast<double>(hi)) : 0.0f};
}

// Round to the output dtype (nearest even) and store kStep elements.
inline void store2(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kVec);
}
// One register of bfloat16, rounded to nearest even, from a step's two float vectors in load2's order.
#if defined(__AVX512BF16__)
// vcvtne2ps2bf16 rounds both vectors in one instruction (a in the low half), then one word permute
// interleaves the halves (a0 b0 a1 b1 ...). The instruction also flushes float32 denormals (below 1.2e-38)
// to zero, which no gradient notices.
inline __m512i to_bf16(const Vec& a, const Vec& b) {
  const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  const __m512i idx = _mm512_set_epi32(0x001f000f, 0x001e000e, 0x001d000d, 0x001c000c, 0x001b000b, 0x001a000a,
                                       0x00190009, 0x00180008, 0x00170007, 0x00160006, 0x00150005, 0x00140004,
                                       0x00130003, 0x00120002, 0x00110001, 0x00100000);
  return _mm512_permutexvar_epi16(idx, halves);
}
#elif defined(CPU_CAPABILITY_AVX512)
// The float bits plus 0x7fff and the kept bit's lsb, truncated: round to nearest even in integers; NaN
// stays a (quiet) NaN. a's rounded bits go to the low half of each 32-bit lane, b's to the high half.
inline __m512i bf16_round_bits(const Vec& v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 is_num = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_blend_epi32(is_num, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)), rounded);
}
inline __m512i to_bf16(const Vec& a, const Vec& b) {
  // (a >> 16) | (b & 0xffff0000)
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(bf16_round_bits(a), 16), bf16_round_bits(b),
                                   _mm512_set1_epi32(static_cast<int>(0xffff0000u)), 0xF8);
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same integer rounding as on AVX-512 without its NaN blend, which costs a tenth of a bfloat16 gradient
// pass on AVX2. That is exact for every float except a NaN with nonzero low 16 bits (the rounding add could
// carry its payload into the exponent), and no gradient pass makes one: bfloat16 logits widen with zero low
// bits, an operation on a NaN passes that NaN on (quieted) or makes the default NaN 0xffc00000, and the
// float32 scalars of a row go through plain_nan() first. The word blend interleaves a and b.
inline __m256i bf16_round_bits(const Vec& v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
}
inline __m256i to_bf16(const Vec& a, const Vec& b) {
  return _mm256_blend_epi16(_mm256_srli_epi32(bf16_round_bits(a), 16), bf16_round_bits(b), 0xAA);
}
#else
inline auto to_bf16(const Vec& a, const Vec& b) {
  return at::vec::convert_float_bfloat16(a, b);
}
#endif

inline void store2(c10::BFloat16* p, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_si512(p, to_bf16(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(a, b));
#else
  to_bf16(a, b).store(p);
#endif
}
inline void store2(c10::Half* p, const Vec& a, const Vec& b) {
  at::vec::convert_float_half(a, b).store(p);
}

// store2 with non-temporal stores, for a gradient row that is written once and not read again soon:
// no read-for-ownership of the destination lines and no eviction of the cached rows. The row must
// pass stream_aligned(); callers end their task with stream_fence().
#if defined(CPU_CAPABILITY_AVX512)
inline void store2_stream(float* p, const Vec& a, const Vec& b) {
  _mm512_stream_ps(p, a);
  _mm512_stream_ps(p + kVec, b);
}
inline void store2_stream(c10::BFloat16* p, const Vec& a, const Vec& b) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), to_bf16(a, b));
}
inline void store2_stream(c10::Half* p, const Vec& a, const Vec& b) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_float_half(a, b));
}
inline void stream_fence() {
  _mm_sfence();
}
constexpr bool kHaveStream = true;
#elif defined(CPU_CAPABILITY_AVX2)
inline void store2_stream(float* p, const Vec& a, const Vec& b) {
  _mm256_stream_ps(p, a);
  _mm256_stream_ps(p + kVec, b);
}
inline void store2_stream(c10::BFloat16* p, const Vec& a, const Vec& b) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(a, b));
}
inline void store2_stream(c10::Half* p, const Vec& a, const Vec& b) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_float_half(a, b));
}
inline void stream_fence() {
  _mm_sfence();
}
constexpr bool kHaveStream = true;
#else
template <typename T>
inline void store2_stream(T* p, const Vec& a, const Vec& b) {
  store2(p, a, b);
}
inline void stream_fence() {}
constexpr bool kHaveStream = false;
#endif

// Whether store2_stream may write at p + i for every i that is a multiple of kStep: p aligned to the
// size of a vector register (64 bytes covers AVX2 and AVX-512).
template <typename T>
inline bool stream_aligned(const T* p) {
  return kHaveStream && reinterpret_cast<uintptr_t>(p) % 64 == 0;
}

// Whether a gradient row g computed from the logits row x is streamed out: a separate buffer written
// once (over x itself, in place, the lines are cached already and plain stores are cheaper).
template <typename T>
inline bool stream_grad(const T* g, const T* x) {
  return static_cast<const void*>(g) != static_cast<const void*>(x) && stream_aligned(g);
}

// store2, or store2_stream with kStream.
template <bool kStream, typename T>
inline void store2_step(T* p, const Vec& a, const Vec& b) {
  if constexpr (kStream) {
    store2_stream(p, a, b);
  } else {
    store2(p, a, b);
  }
}

// store2_step, but plain stores where `plain`: the step of a streamed row that is rewritten with plain
// stores afterwards (its lines must never be streamed, or a streamed line could land after the rewrite).
template <bool kStream, typename T>
inline void store2_step(T* p, const Vec& a, const Vec& b, bool plain) {
  if (kStream && plain) {
    store2(p, a, b);
  } else {
    store2_step<kStream>(p, a, b);
  }
}

template <typename T>
inline void store2_tail(T* p, int64_t n, const Vec& a, const Vec& b) {
  float buf[kStep];
  a.store(buf);
  b.store(buf + kVec);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(buf[i]);
  }
}

// Asks for the kStep elements at p to be brought into L2 (no fault if p is not mapped). A pass that reads
// a row from memory calls it with the next row at the offset it is reading: one row ahead, that row
// arrives while this one is worked on (and its gradient streamed out: reads and writes overlap, as in a
// copy), where the hardware prefetcher alone would start again at every 4 KiB page.
template <typename T>
inline void prefetch_step(const T* p) {
  constexpr int64_t kLine = 64;
  for (int64_t b = 0; b < kStep * static_cast<int64_t>(sizeof(T)); b += kLine) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 2);
  }
}

// Runs f(a, b) over x[0, n) two vectors at a time; the tail is padded with `fill`.
template <typename T, typename F>
inline void for_each_step(const T* x, int64_t n, float fill, F&& f) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec a, b;
    load2(x + i, a, b);
    f(a, b);
  }
  if (i < n) {
    Vec a, b;
    load2_tail(x + i, n - i, fill, a, b);
    f(a, b);
  }
}

// Largest raw logit of x[0, n); -inf pads the tail. (NaN logits give NaN results further on.)
template <typename T>
inline float chunk_max(const T* x, int64_t n) {
  Vec m0(-kInf), m1(-kInf);
  for_each_step(x, n, -kInf, [&](const Vec& a, const Vec& b) {
    m0 = at::vec::clamp_min(a, m0);
    m1 = at::vec::clamp_min(b, m1);
  });
  return hmax(at::vec::maximum(m0, m1));
}

template <typename T>
inline const T* row_ptr(const Rows& rows, int64_t r) {
  const int64_t a = r / rows.B;
  const int64_t b = r - a * rows.B;
  return static_cast<const T*>(rows.data) + a * rows.stride0 + b * rows.stride1;
}

// The row to prefetch while row r of [begin, end) is worked on: r + 1, or r itself at the end.
template <typename T>
inline const T* next_row(const Rows& rows, int64_t r, int64_t end) {
  return row_ptr<T>(rows, r + 1 < end ? r + 1 : r);
}

// Calls f.template operator()<T>() with T the C++ type of `dtype`.
template <typename F>
inline void dispatch_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::Float:
      f.template operator()<float>();
      break;
    case Dtype::BFloat16:
      f.template operator()<c10::BFloat16>();
      break;
    case Dtype::Half:
      f.template operator()<c10::Half>();
      break;
  }
}

}  // namespace rlhf_fast::cpu::CPU_CAPABILITY
