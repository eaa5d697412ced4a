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
// then see the same float x: for a logit of 1e4 the max element still gets exactly x - lse = 0
// (p = 1) from an lse stored as float32, as in eager PyTorch.

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
inline Vec vexp(const Vec& d_) {
  const __m512 d = d_;
  // Lanes below the flush point (and -inf, whose r would be NaN) give 0; NaN stays NaN.
  const __mmask16 keep = _mm512_cmp_ps_mask(d, _mm512_set1_ps(kExpFlush), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), d);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC5), r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);  // p * 2^n; overflows to +inf for d > 88.7
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vexp(const Vec& d_) {
  // min/max return their second operand for a NaN, so NaN lanes stay NaN throughout.
  const __m256 d = _mm256_min_ps(_mm256_set1_ps(88.0f), d_);  // keeps 2^n's exponent field in range
  const __m256 keep = _mm256_cmp_ps(d, _mm256_set1_ps(kExpFlush), _CMP_NLT_UQ);
  const __m256 dc = _mm256_max_ps(_mm256_set1_ps(kExpFlush), d);  // -inf would make r NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(dc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), dc);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n built in the exponent field: n is in [-126, 127].
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
#else
inline Vec vexp(const Vec& d) {
  return d.exp();  // scalar std::exp per lane
}
#endif

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Two vectors of float from kStep logits, upcast in registers (no float32 copy of the row).
inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kVec);
}
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  at::vec::load_fp32_from_bf16(p, a, b);
}
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

// Round to the output dtype (nearest even) and store kStep elements.
inline void store2(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + kVec);
}
// Two float vectors rounded to one register of bfloat16 (nearest even). The AVX512_BF16 variant does it in
// one instruction (vcvtne2ps2bf16) where at::vec needs about ten integer ones per vector; that
// instruction also flushes float32 denormals (below 1.2e-38) to zero, which no gradient notices.
#if defined(__AVX512BF16__)
inline __m512i to_bf16(const Vec& a, const Vec& b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in the low half
}
#else
inline auto to_bf16(const Vec& a, const Vec& b) {
  return at::vec::convert_float_bfloat16(a, b);
}
#endif

inline void store2(c10::BFloat16* p, const Vec& a, const Vec& b) {
#if defined(__AVX512BF16__)
  _mm512_storeu_si512(p, to_bf16(a, b));
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
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_float_bfloat16(a, b));
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

template <typename T>
inline void store2_tail(T* p, int64_t n, const Vec& a, const Vec& b) {
  float buf[kStep];
  a.store(buf);
  b.store(buf + kVec);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(buf[i]);
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
