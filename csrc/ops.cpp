// rlhf_fast._C: the CPU backend as torch custom ops (torch.ops.rlhf_fast_C.*).
//
// This file checks the tensors, allocates the outputs and splits the rows over threads; the row
// kernels live in csrc/cpu/, built once per CPU capability. The capability is chosen once, the
// way ATen chooses its own kernels (so ATEN_CPU_CAPABILITY=default|avx2 forces a slower path).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#include <cstdlib>

#include "buffer_cache.h"
#include "cpu/kernels.h"

namespace rlhf_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace k = rlhf_fast::cpu;

// ------------------------------------------------------------------------------ kernel choice

struct KernelTable {
  decltype(&k::DEFAULT::token_stats_fwd) token_stats_fwd;
  decltype(&k::DEFAULT::token_stats_bwd) token_stats_bwd;
  decltype(&k::DEFAULT::token_stats_fused) token_stats_fused;
  decltype(&k::DEFAULT::kl_fwd) kl_fwd;
  decltype(&k::DEFAULT::kl_bwd) kl_bwd;
  const char* name;
};

#define RLHF_FAST_TABLE(ns)                                                                 \
  KernelTable{&k::ns::token_stats_fwd, &k::ns::token_stats_bwd, &k::ns::token_stats_fused, \
              &k::ns::kl_fwd, &k::ns::kl_bwd, #ns}

// AVX512_BF16 (CPUID leaf 7, sub-leaf 1, EAX bit 5): vcvtne2ps2bf16 rounds two float vectors to bfloat16
// in one instruction. RLHF_FAST_AVX512_BF16=0 keeps the plain AVX512 kernels (to compare them).
bool use_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const char* env = std::getenv("RLHF_FAST_AVX512_BF16");
  if (env != nullptr && std::string(env) == "0") return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
#else
  return false;
#endif
}

// The best variant that was built and that ATen itself would use on this CPU.
const KernelTable& kernels() {
  static const KernelTable table = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
#ifdef RLHF_FAST_HAVE_AVX512_BF16
    if (cap == "AVX512" && use_avx512_bf16()) return RLHF_FAST_TABLE(AVX512_BF16);
#endif
#ifdef RLHF_FAST_HAVE_AVX512
    if (cap == "AVX512") return RLHF_FAST_TABLE(AVX512);
#endif
#ifdef RLHF_FAST_HAVE_AVX2
    if (cap == "AVX512" || cap == "AVX2") return RLHF_FAST_TABLE(AVX2);
#endif
    return RLHF_FAST_TABLE(DEFAULT);
  }();
  return table;
}

// ------------------------------------------------------------------------------ checks

k::Dtype checked_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return k::Dtype::Float;
    case at::kBFloat16:
      return k::Dtype::BFloat16;
    case at::kHalf:
      return k::Dtype::Half;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

k::Rows checked_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [A, B, V], got shape ", t.sizes());
  TORCH_CHECK(t.size(2) > 0, name, " must have a non-empty last dimension");
  TORCH_CHECK(t.size(2) == 1 || t.stride(2) == 1, name, " must have a contiguous last dimension, got strides ",
              t.strides());
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.size(1), t.size(2), checked_dtype(t, name)};
}

// A contiguous per-row tensor [N] of the given dtype.
void check_per_row(const Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The kernels index rows with labels: one bad label would be an out-of-bounds read. A ValueError in Python,
// with the message of rlhf_fast.ops._custom.check_labels_in_range, which the cpp backend leaves to this check.
const int64_t* checked_labels(const OptTensor& labels, int64_t n, int64_t V, int64_t ignore_index) {
  if (!labels.has_value()) return nullptr;
  check_per_row(*labels, n, at::kLong, "labels");
  const int64_t* data = labels->const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_VALUE((data[r] >= 0 && data[r] < V) || data[r] == ignore_index, "labels must lie in [0, ", V,
                      ") or equal ignore_index=", ignore_index, "; found ", data[r]);
  }
  return data;
}

const float* optional_f32(const OptTensor& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  check_per_row(*t, n, at::kFloat, name);
  return t->const_data_ptr<float>();
}

const double* optional_f64(const OptTensor& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  check_per_row(*t, n, at::kDouble, name);
  return t->const_data_ptr<double>();
}

float checked_inv_temp(double temperature) {
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

// ------------------------------------------------------------------------------ outputs

Tensor per_row(int64_t n, const Tensor& like, at::ScalarType dtype = at::kFloat) {
  return at::empty({n}, like.options().dtype(dtype));
}

// A contiguous gradient like `logits`, from the buffer cache when it is large (buffer_cache.h).
Tensor empty_grad(const Tensor& logits) {
  return cached_empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
}

// Each task gets at least ~32k logits, so small inputs are not split into tiny tasks.
int64_t grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / V);
}

// ------------------------------------------------------------------------------ the ops

std::tuple<Tensor, Tensor, Tensor, Tensor> token_stats_fwd(const Tensor& logits, const OptTensor& labels,
                                                           double temperature, int64_t ignore_index,
                                                           bool with_logp, bool with_entropy,
                                                           bool with_mean_logp) {
  const k::Rows rows = checked_rows(logits, "logits");
  const int64_t n = logits.size(0) * logits.size(1);
  TORCH_CHECK(!with_logp || labels.has_value(), "with_logp needs labels");
  const int64_t* label_data = checked_labels(labels, n, rows.V, ignore_index);

  Tensor logp = per_row(with_logp ? n : 0, logits);
  Tensor entropy = per_row(with_entropy ? n : 0, logits, at::kDouble);
  Tensor lse = per_row(n, logits, at::kDouble);
  Tensor mean_logp = per_row(with_mean_logp ? n : 0, logits);
  const k::TokenStatsFwdArgs args{rows,
                                  label_data,
                                  ignore_index,
                                  checked_inv_temp(temperature),
                                  with_logp ? logp.data_ptr<float>() : nullptr,
                                  with_entropy ? entropy.data_ptr<double>() : nullptr,
                                  lse.data_ptr<double>(),
                                  with_mean_logp ? mean_logp.data_ptr<float>() : nullptr};
  const auto kernel = kernels().token_stats_fwd;
  at::parallel_for(0, n, grain(rows.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {logp, entropy, lse, mean_logp};
}

Tensor token_stats_bwd(const Tensor& logits, const OptTensor& labels, const Tensor& lse, const OptTensor& entropy,
                       const OptTensor& grad_logp, const OptTensor& grad_entropy, const OptTensor& grad_mean_logp,
                       double temperature, int64_t ignore_index) {
  const k::Rows rows = checked_rows(logits, "logits");
  const int64_t n = logits.size(0) * logits.size(1);
  TORCH_CHECK(!grad_logp.has_value() || labels.has_value(), "grad_logp needs labels");
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(), "grad_entropy needs entropy");
  check_per_row(lse, n, at::kDouble, "lse");

  Tensor grad = empty_grad(logits);
  const k::TokenStatsBwdArgs args{rows,
                                  checked_labels(labels, n, rows.V, ignore_index),
                                  ignore_index,
                                  checked_inv_temp(temperature),
                                  lse.const_data_ptr<double>(),
                                  optional_f64(grad_entropy.has_value() ? entropy : std::nullopt, n, "entropy"),
                                  optional_f32(grad_logp, n, "grad_logp"),
                                  optional_f32(grad_entropy, n, "grad_entropy"),
                                  optional_f32(grad_mean_logp, n, "grad_mean_logp"),
                                  grad.data_ptr(),
                                  0,
                                  rows.V};
  const auto kernel = kernels().token_stats_bwd;
  at::parallel_for(0, n, grain(rows.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return grad;
}

// token_stats_bwd over the vocabulary columns [col0, col0 + Vb) of `block` ([A, B, Vb], contiguous),
// written over the block itself, with the upstream gradients as coefs [3, N] = (g_lp, g_H, g_u) and the
// statistics of the whole rows (lse, and H when the entropy term is on) from an earlier pass.
void token_stats_block_grad_(const Tensor& block, const Tensor& labels, const Tensor& lse, const OptTensor& entropy,
                             const Tensor& coefs, int64_t col0, int64_t vocab, double temperature,
                             int64_t ignore_index) {
  const k::Rows rows = checked_rows(block, "block");
  TORCH_CHECK(block.is_contiguous(), "block must be contiguous");
  const int64_t n = block.size(0) * block.size(1);
  TORCH_CHECK(col0 >= 0 && col0 + rows.V <= vocab, "block columns [", col0, ", ", col0 + rows.V,
              ") must lie in [0, vocab=", vocab, ")");
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == 3 && coefs.size(1) == n && coefs.is_contiguous() &&
                  coefs.scalar_type() == at::kFloat,
              "coefs must be a contiguous float32 [3, ", n, "] tensor, got ", coefs.sizes());
  check_per_row(lse, n, at::kDouble, "lse");
  const float* c = coefs.const_data_ptr<float>();
  const k::TokenStatsBwdArgs args{rows,
                                  checked_labels(labels, n, vocab, ignore_index),
                                  ignore_index,
                                  checked_inv_temp(temperature),
                                  lse.const_data_ptr<double>(),
                                  optional_f64(entropy, n, "entropy"),
                                  c,
                                  entropy.has_value() ? c + n : nullptr,
                                  c + 2 * n,
                                  block.data_ptr(),
                                  col0,
                                  vocab};
  const auto kernel = kernels().token_stats_bwd;
  at::parallel_for(0, n, grain(rows.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> token_stats_fused(const Tensor& logits, const Tensor& labels,
                                                             double temperature, int64_t ignore_index,
                                                             bool with_entropy, bool with_mean_logp, int64_t mode,
                                                             const Tensor& coefs, at::ArrayRef<double> params,
                                                             const Tensor& grad) {
  const k::Rows rows = checked_rows(logits, "logits");
  const int64_t n = logits.size(0) * logits.size(1);
  const int64_t* label_data = checked_labels(labels, n, rows.V, ignore_index);
  TORCH_CHECK(mode == 0 || mode == 1, "mode must be 0 (coefficients) or 1 (PPO), got ", mode);
  const int64_t n_coefs = mode == 0 ? 3 : 4;
  TORCH_CHECK(coefs.device().is_cpu() && coefs.scalar_type() == at::kFloat && coefs.is_contiguous() &&
                  coefs.dim() == 2 && coefs.size(0) == n_coefs && coefs.size(1) == n,
              "coefs must be a contiguous float32 CPU tensor of shape [", n_coefs, ", ", n, "], got ",
              coefs.scalar_type(), " ", coefs.sizes());
  k::PpoParams ppo{};
  if (mode == 1) {
    TORCH_CHECK(params.size() == 6,
                "PPO params are [clip_low, clip_high, dual_clip, kl_coef, kl_kind, entropy_coef], got ", params);
    const int kl_kind = static_cast<int>(params[4]);
    TORCH_CHECK(params[3] == 0.0 || (kl_kind >= 1 && kl_kind <= 3), "kl_kind must be 1, 2 or 3, got ", params[4]);
    ppo = {static_cast<float>(1.0 - params[0]), static_cast<float>(1.0 + params[1]), static_cast<float>(params[2]),
           static_cast<float>(params[3]), kl_kind, static_cast<float>(params[5])};
  }
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == logits.scalar_type() &&
                  grad.sizes() == logits.sizes(),
              "grad must be a CPU tensor of the logits' dtype and shape");
  TORCH_CHECK(rows.V == 1 || grad.stride(2) == 1, "grad must have a contiguous last dimension");
  if (grad.data_ptr() != logits.data_ptr()) {
    advise_huge_pages(grad);  // not the in-place case: a fresh buffer, not touched yet
  }

  Tensor logp = per_row(n, logits);
  Tensor entropy = per_row(with_entropy ? n : 0, logits, at::kDouble);
  Tensor lse = per_row(n, logits, at::kDouble);
  Tensor mean_logp = per_row(with_mean_logp ? n : 0, logits);
  const k::TokenStatsFusedArgs args{rows,
                                    label_data,
                                    ignore_index,
                                    checked_inv_temp(temperature),
                                    static_cast<int>(mode),
                                    coefs.const_data_ptr<float>(),
                                    n,
                                    ppo,
                                    logp.data_ptr<float>(),
                                    with_entropy ? entropy.data_ptr<double>() : nullptr,
                                    lse.data_ptr<double>(),
                                    with_mean_logp ? mean_logp.data_ptr<float>() : nullptr,
                                    grad.data_ptr(),
                                    grad.stride(0),
                                    grad.stride(1)};
  const auto kernel = kernels().token_stats_fused;
  at::parallel_for(0, n, grain(rows.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {logp, entropy, lse, mean_logp};
}

void check_same_rows(const Tensor& p_logits, const Tensor& q_logits) {
  TORCH_CHECK(p_logits.sizes() == q_logits.sizes(), "p_logits and q_logits must have the same shape, got ",
              p_logits.sizes(), " and ", q_logits.sizes());
  TORCH_CHECK(p_logits.scalar_type() == q_logits.scalar_type(),
              "p_logits and q_logits must have the same dtype, got ", p_logits.scalar_type(), " and ",
              q_logits.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> kl_fwd(const Tensor& p_logits, const Tensor& q_logits, double temperature) {
  const k::Rows p = checked_rows(p_logits, "p_logits");
  const k::Rows q = checked_rows(q_logits, "q_logits");
  check_same_rows(p_logits, q_logits);
  const int64_t n = p_logits.size(0) * p_logits.size(1);

  Tensor kl = per_row(n, p_logits);
  Tensor lse_p = per_row(n, p_logits, at::kDouble);
  Tensor lse_q = per_row(n, p_logits, at::kDouble);
  const k::KlFwdArgs args{p,
                          q,
                          checked_inv_temp(temperature),
                          kl.data_ptr<float>(),
                          lse_p.data_ptr<double>(),
                          lse_q.data_ptr<double>()};
  const auto kernel = kernels().kl_fwd;
  // Two rows are read per row index.
  at::parallel_for(0, n, grain(2 * p.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {kl, lse_p, lse_q};
}

std::tuple<Tensor, Tensor> kl_bwd(const Tensor& p_logits, const Tensor& q_logits, const Tensor& lse_p,
                                  const Tensor& lse_q, const Tensor& kl, const Tensor& grad_kl, double temperature,
                                  bool need_p, bool need_q) {
  const k::Rows p = checked_rows(p_logits, "p_logits");
  const k::Rows q = checked_rows(q_logits, "q_logits");
  check_same_rows(p_logits, q_logits);
  const int64_t n = p_logits.size(0) * p_logits.size(1);
  check_per_row(lse_p, n, at::kDouble, "lse_p");
  check_per_row(lse_q, n, at::kDouble, "lse_q");
  check_per_row(kl, n, at::kFloat, "kl");
  check_per_row(grad_kl, n, at::kFloat, "grad_kl");

  Tensor grad_p = need_p ? empty_grad(p_logits) : per_row(0, p_logits);  // not needed: empty float32 [0]
  Tensor grad_q = need_q ? empty_grad(q_logits) : per_row(0, q_logits);
  if (!need_p && !need_q) return {grad_p, grad_q};
  const k::KlBwdArgs args{p,
                          q,
                          checked_inv_temp(temperature),
                          lse_p.const_data_ptr<double>(),
                          lse_q.const_data_ptr<double>(),
                          kl.const_data_ptr<float>(),
                          grad_kl.const_data_ptr<float>(),
                          need_p ? grad_p.data_ptr() : nullptr,
                          need_q ? grad_q.data_ptr() : nullptr};
  const auto kernel = kernels().kl_bwd;
  at::parallel_for(0, n, grain(2 * p.V), [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {grad_p, grad_q};
}

// ------------------------------------------------------------------------------ Python module

PyObject* py_cpu_capability(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(kernels().name);
}

// The cache reads RLHF_FAST_CACHE_BYTES on first use, and a bad value is an error: raise it in Python
// (these functions are plain module methods, outside the dispatcher that translates c10::Error).
template <typename F>
PyObject* raising(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_cache_info(PyObject* /*self*/, PyObject* /*args*/) {
  return raising([] {
    const CacheInfo i = cache_info();
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "idle_bytes", static_cast<long long>(i.idle_bytes), "idle_blocks",
                       static_cast<long long>(i.idle_blocks), "limit_bytes", static_cast<long long>(i.limit_bytes),
                       "hits", static_cast<long long>(i.hits), "misses", static_cast<long long>(i.misses));
  });
}

PyObject* py_empty_cache(PyObject* /*self*/, PyObject* /*args*/) {
  return raising([] { return PyLong_FromLongLong(empty_cache()); });
}

PyObject* py_set_cache_limit(PyObject* /*self*/, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);  // range checked by set_cache_limit (and in Python)
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  return raising([bytes] { return PyLong_FromLongLong(set_cache_limit(bytes)); });
}

PyMethodDef module_methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS,
     "The CPU kernel variant in use: 'DEFAULT', 'AVX2', 'AVX512' or 'AVX512_BF16'."},
    {"cache_info", py_cache_info, METH_NOARGS, "The gradient buffer cache's counters (see buffer_cache.h)."},
    {"empty_cache", py_empty_cache, METH_NOARGS, "Unmap every idle cached buffer; returns the bytes released."},
    {"set_cache_limit", py_set_cache_limit, METH_O, "Set the idle byte limit of the cache; returns the old one."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rlhf_fast CPU kernels (ops in torch.ops.rlhf_fast_C)", -1,
                          module_methods};

}  // namespace
}  // namespace rlhf_fast

// Importing the module runs the TORCH_LIBRARY registrations below.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&rlhf_fast::module_def);
}

TORCH_LIBRARY(rlhf_fast_C, m) {
  m.def(
      "token_stats_fwd(Tensor logits, Tensor? labels, float temperature, int ignore_index, bool with_logp, "
      "bool with_entropy, bool with_mean_logp) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_stats_bwd(Tensor logits, Tensor? labels, Tensor lse, Tensor? entropy, Tensor? grad_logp, "
      "Tensor? grad_entropy, Tensor? grad_mean_logp, float temperature, int ignore_index) -> Tensor");
  m.def(
      "token_stats_fused(Tensor logits, Tensor labels, float temperature, int ignore_index, bool with_entropy, "
      "bool with_mean_logp, int mode, Tensor coefs, float[] params, Tensor(a!) grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_stats_block_grad_(Tensor(a!) block, Tensor labels, Tensor lse, Tensor? entropy, Tensor coefs, "
      "int col0, int vocab, float temperature, int ignore_index) -> ()");
  m.def("kl_fwd(Tensor p_logits, Tensor q_logits, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_bwd(Tensor p_logits, Tensor q_logits, Tensor lse_p, Tensor lse_q, Tensor kl, Tensor grad_kl, "
      "float temperature, bool need_p, bool need_q) -> (Tensor, Tensor)");
  m.def("empty_grad(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast_C, CPU, m) {
  m.impl("token_stats_fwd", &rlhf_fast::token_stats_fwd);
  m.impl("token_stats_bwd", &rlhf_fast::token_stats_bwd);
  m.impl("token_stats_fused", &rlhf_fast::token_stats_fused);
  m.impl("token_stats_block_grad_", &rlhf_fast::token_stats_block_grad_);
  m.impl("kl_fwd", &rlhf_fast::kl_fwd);
  m.impl("kl_bwd", &rlhf_fast::kl_bwd);
  m.impl("empty_grad", &rlhf_fast::empty_grad);
}
