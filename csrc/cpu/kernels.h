// The row kernels of the CPU backend and the plain structs they take.
//
// token_stats.cpp and kl_div.cpp are compiled once per CPU capability (setup.py passes
// -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512|AVX512_BF16 with the matching -m flags), which puts their code
// in the namespaces rlhf_fast::cpu::DEFAULT / AVX2 / AVX512 / AVX512_BF16 declared below. ops.cpp checks the tensors,
// picks one namespace at run time and splits the rows over threads. This header includes no torch
// header, so the per-capability objects stay small and quick to build.
#pragma once

#include <cstdint>

namespace rlhf_fast::cpu {

enum class Dtype : int { Float, BFloat16, Half };

// Logits viewed as [A, B, V] with a contiguous last dim (a logits[:, :-1] slice, uncopied):
// row r = a * B + b starts at data + a * stride0 + b * stride1 (strides in elements).
struct Rows {
  const void* data;
  int64_t stride0, stride1;
  int64_t B, V;
  Dtype dtype;
};

// Per-row outputs and inputs are contiguous [N]; optional ones are nullptr when absent.
struct TokenStatsFwdArgs {
  Rows logits;
  const int64_t* labels;  // nullptr: no labels, no rows skipped
  int64_t ignore_index;
  float inv_temp;
  float* logp;       // nullptr unless asked for
  double* entropy;   // nullptr unless asked for; double, so that lse - entropy = E[x] (see bwd_rows)
  double* lse;       // double: see SplitLse in vec_utils.h
  float* mean_logp;  // nullptr unless asked for
};

struct TokenStatsBwdArgs {
  Rows logits;
  const int64_t* labels;
  int64_t ignore_index;
  float inv_temp;
  const double* lse;
  const double* entropy;      // needed with grad_entropy (the forward's, see TokenStatsFwdArgs)
  const float* grad_logp;       // nullptr: no log-prob term (then labels only mark ignored rows)
  const float* grad_entropy;    // nullptr: no entropy term
  const float* grad_mean_logp;  // nullptr: no mean-log-prob term
  void* grad;                   // [N, V] contiguous, logits dtype; may be the logits themselves
  // The rows may be columns [col0, col0 + V) of rows of `vocab` logits (col0 = 0, vocab = V: whole rows).
  int64_t col0, vocab;
};

// PPO per-token loss terms (mode 1 of token_stats_fused): see ppo_coefs() in token_stats.cpp.
struct PpoParams {
  float ratio_low, ratio_high;  // 1 - clip_low, 1 + clip_high
  float dual_clip;              // 0: off
  float kl_coef;
  int kl_kind;  // 1 | 2 | 3: the k1 | k2 | k3 estimator
  float entropy_coef;
};

// token_stats_fwd that also writes the gradient of a loss while each row is still in cache.
// Mode 0: coefs is [3, N] = (g_lp, g_H, g_u) per row. Mode 1 (PPO): coefs is [4, N] =
// (old_logp, advantage, ref_logp, weight) and the row's coefficients come from ppo_coefs().
struct TokenStatsFusedArgs {
  Rows logits;
  const int64_t* labels;  // never nullptr here
  int64_t ignore_index;
  float inv_temp;
  int mode;
  const float* coefs;  // contiguous [3 or 4, n]
  int64_t n;           // rows
  PpoParams ppo;
  float* logp;
  double* entropy;   // nullptr unless asked for (then no entropy term either)
  double* lse;
  float* mean_logp;  // nullptr unless asked for
  // [A, B, V] in the logits dtype, last dim contiguous; may be the logits themselves: every
  // element is read before it is overwritten.
  void* grad;
  int64_t grad_stride0, grad_stride1;
};

struct KlFwdArgs {
  Rows p, q;
  float inv_temp;
  float* kl;
  double* lse_p;
  double* lse_q;
};

struct KlBwdArgs {
  Rows p, q;
  float inv_temp;
  const double* lse_p;
  const double* lse_q;
  const float* kl;
  const float* grad_kl;
  void* grad_p;  // [N, V] contiguous, or nullptr when not needed
  void* grad_q;
};

// Each function handles rows [begin, end); ops.cpp calls it from inside at::parallel_for.
#define RLHF_FAST_ROW_KERNELS                                                            \
  void token_stats_fwd(const TokenStatsFwdArgs& args, int64_t begin, int64_t end);     \
  void token_stats_bwd(const TokenStatsBwdArgs& args, int64_t begin, int64_t end);     \
  void token_stats_fused(const TokenStatsFusedArgs& args, int64_t begin, int64_t end); \
  void kl_fwd(const KlFwdArgs& args, int64_t begin, int64_t end);                      \
  void kl_bwd(const KlBwdArgs& args, int64_t begin, int64_t end);

namespace DEFAULT {
RLHF_FAST_ROW_KERNELS
}
namespace AVX2 {
RLHF_FAST_ROW_KERNELS
}
namespace AVX512 {
RLHF_FAST_ROW_KERNELS
}
namespace AVX512_BF16 {  // AVX512 plus the bfloat16 conversion instructions
RLHF_FAST_ROW_KERNELS
}

#undef RLHF_FAST_ROW_KERNELS

}  // namespace rlhf_fast::cpu
