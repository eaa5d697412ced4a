// Large CPU buffers kept for reuse after their tensor dies (the gradients as big as the logits).
//
// glibc serves every block above 32 MiB with its own mmap and unmaps it on free, so a
// [tokens, vocab] gradient allocated on every training step is zeroed by the kernel and faulted in
// again each time: at 4096 x 32000 float32 that costs as much as the kernel that fills it (128 ms
// against 67 ms into an already-resident buffer, on this repository's 2-core Xeon). This cache
// keeps freed blocks mapped, up to a limit, and hands them to the next request of about the same
// size, as PyTorch's CUDA caching allocator does on GPUs.
//
// Policy:
//  * requests under kMinCachedBytes go to at::empty (glibc's heap reuses those already);
//  * a request takes the smallest idle block that fits it with at most 1/4 (or 2 MiB) to spare;
//  * a request that finds none first unmaps every idle block, so idle memory never adds to the
//    peak of a step whose sizes changed;
//  * a freed block stays idle only while the idle total stays within the limit
//    (RLHF_FAST_CACHE_BYTES at first use, default 4 GiB; 0 disables the cache);
//  * empty_cache() unmaps every idle block (rlhf_fast.empty_cache() in Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rlhf_fast {

inline constexpr int64_t kMinCachedBytes = int64_t{4} << 20;

// An uninitialized contiguous CPU tensor, from the cache when it is large enough; either way its
// 2 MiB-aligned interior is advised to use huge pages.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Asks for transparent huge pages on the 2 MiB-aligned interior of t's memory before its first touch
// (4 KiB page faults over a 500 MB gradient cost ~125 ms, 2 MiB ones ~15 ms). Advice only: without THP
// support, or on memory already touched, nothing changes.
void advise_huge_pages(const at::Tensor& t);

struct CacheInfo {
  int64_t idle_bytes;  // mapped, not in use by any tensor
  int64_t idle_blocks;
  int64_t limit_bytes;
  int64_t hits;    // requests served by an idle block
  int64_t misses;  // cacheable requests that mapped a new block
};

CacheInfo cache_info();

// Unmaps every idle block; returns the bytes released.
int64_t empty_cache();

// Sets the idle limit (bytes, >= 0), releasing idle blocks above it; returns the previous limit.
int64_t set_cache_limit(int64_t bytes);

}  // namespace rlhf_fast
