"""The cpp backend's cache of large gradient buffers.

A gradient as large as the logits (``[tokens, vocab]``) is a fresh ``mmap`` for glibc on every call:
the kernel zeroes it and faults it in page by page, which at 4096 × 32000 float32 costs about as
much as computing the gradient. The cpp backend therefore keeps such buffers mapped after the
tensor that used them dies and hands them to the next call of about the same size, as PyTorch's
CUDA caching allocator does on GPUs (policy in ``csrc/buffer_cache.h``). Idle buffers are held up to
``RLHF_FAST_CACHE_BYTES`` (read at first use, default 4 GiB; ``0`` turns the cache off) and count
toward the process's resident memory until :func:`empty_cache` releases them. A request whose size
matches no idle buffer releases them all first, so the cache never raises a step's peak memory.
"""

from __future__ import annotations

from rlhf_fast._dispatch import _C


def cache_info() -> dict[str, int]:
    """``{"idle_bytes", "idle_blocks", "limit_bytes", "hits", "misses"}`` of the cache (all 0 without
    the C++ extension)."""
    if _C is None:
        return dict.fromkeys(("idle_bytes", "idle_blocks", "limit_bytes", "hits", "misses"), 0)
    return _C.cache_info()


def empty_cache() -> int:
    """Release every idle cached buffer to the operating system; returns the bytes released."""
    return 0 if _C is None else _C.empty_cache()


def set_cache_limit(limit_bytes: int) -> int:
    """Hold at most ``limit_bytes`` of idle buffers (``0``: no caching); returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return 0 if _C is None else _C.set_cache_limit(limit_bytes)
