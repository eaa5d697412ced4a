// See buffer_cache.h for what this is and why.
#include "buffer_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_fast {
namespace {

constexpr int64_t kHuge = int64_t{2} << 20;  // transparent huge page size on x86-64 and arm64
constexpr int64_t kDefaultLimit = int64_t{4} << 30;

int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

struct Block {
  void* ptr;
  int64_t bytes;
};

// madvise(MADV_HUGEPAGE) on the whole 2 MiB pages inside [start, start + bytes), if there are two or more.
void advise_range(uintptr_t start, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto huge = static_cast<uintptr_t>(kHuge);
  const uintptr_t first = (start + huge - 1) & ~(huge - 1);
  const uintptr_t last = (start + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  if (last >= first + 2 * huge) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

#if defined(__linux__)

// A 2 MiB-aligned mapping of `bytes` (a multiple of 2 MiB), advised to use huge pages.
void* map_block(int64_t bytes) {
  const auto span = static_cast<size_t>(bytes + kHuge);
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "rlhf_fast: cannot map a ", bytes, "-byte gradient buffer (out of memory)");
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~static_cast<uintptr_t>(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + span;
  const uintptr_t used_end = aligned + static_cast<uintptr_t>(bytes);
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  advise_range(aligned, bytes);
  return reinterpret_cast<void*>(aligned);
}

void unmap_block(const Block& b) {
  munmap(b.ptr, static_cast<size_t>(b.bytes));
}

int64_t limit_from_env() {
  const char* env = std::getenv("RLHF_FAST_CACHE_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultLimit;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && value >= 0,
              "RLHF_FAST_CACHE_BYTES must be a whole number of bytes >= 0, got '", env, "'");
  return value;
}

class Cache {
 public:
  Cache() : limit_(limit_from_env()) {}

  Block take(int64_t need) {
    std::vector<Block> released;
    Block found{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int64_t spare = std::max(need / 4, kHuge);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->bytes >= need && it->bytes - need <= spare && (best == idle_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != idle_.end()) {
        found = *best;
        idle_.erase(best);
        idle_bytes_ -= found.bytes;
        ++hits_;
      } else {
        released.swap(idle_);
        idle_bytes_ = 0;
        ++misses_;
      }
    }
    for (const Block& b : released) unmap_block(b);  // outside the lock: munmap of GBs takes a while
    if (found.ptr != nullptr) return found;
    const int64_t bytes = round_up(need, kHuge);
    return {map_block(bytes), bytes};
  }

  void give_back(Block b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + b.bytes <= limit_) {
        idle_.push_back(b);
        idle_bytes_ += b.bytes;
        return;
      }
    }
    unmap_block(b);
  }

  int64_t release(int64_t keep) {
    std::vector<Block> released;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Largest first, so what stays is what fits under `keep`.
      std::sort(idle_.begin(), idle_.end(), [](const Block& a, const Block& b) { return a.bytes > b.bytes; });
      while (!idle_.empty() && idle_bytes_ > keep) {
        released.push_back(idle_.front());
        idle_bytes_ -= idle_.front().bytes;
        freed += idle_.front().bytes;
        idle_.erase(idle_.begin());
      }
    }
    for (const Block& b : released) unmap_block(b);
    return freed;
  }

  int64_t set_limit(int64_t bytes) {
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_;
      limit_ = bytes;
    }
    release(bytes);
    return previous;
  }

  CacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, static_cast<int64_t>(idle_.size()), limit_, hits_, misses_};
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_ > 0;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> idle_;
  int64_t idle_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: tensors that outlive static destruction still return their blocks to it.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

#endif  // __linux__

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t need = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (need >= kMinCachedBytes && options.device().is_cpu() && cache().enabled()) {
    const Block block = cache().take(need);
    return at::from_blob(
        block.ptr, sizes, [block](void*) { cache().give_back(block); }, options);
  }
#endif
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

void advise_huge_pages(const at::Tensor& t) {
  advise_range(reinterpret_cast<uintptr_t>(t.data_ptr()), static_cast<int64_t>(t.nbytes()));
}

CacheInfo cache_info() {
#if defined(__linux__)
  return cache().info();
#else
  return {0, 0, 0, 0, 0};
#endif
}

int64_t empty_cache() {
#if defined(__linux__)
  return cache().release(0);
#else
  return 0;
#endif
}

int64_t set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cache limit must be >= 0 bytes, got ", bytes);
#if defined(__linux__)
  return cache().set_limit(bytes);
#else
  return 0;
#endif
}

}  // namespace rlhf_fast
