"""The ahead-of-time compile of every Triton kernel specialization, done once per test session.

``tests/test_triton_aot.py`` checks each result and ``tests/test_bench_ptx.py`` checks the
``rlhf-fast bench --ptx`` report built from the same results; both take them from :func:`compiled`,
so the ~75 s (cold Triton cache) compile runs once however many of the two modules are selected.
Import it only after ``pytest.importorskip("triton")``.
"""

from __future__ import annotations

import functools

import torch

from rlhf_fast.kernels import aot

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPECS = aot.all_specs(DTYPES)
# (index into SPECS, cc), in the order compile_all returns its results
CASES = [(i, cc) for i in range(len(SPECS)) for cc in aot.TARGETS]


@functools.cache
def compiled() -> dict[tuple[int, int], aot.AotResult]:
    """AotResult per case; a compile error raises with Triton's or ptxas' message."""
    return dict(zip(CASES, aot.compile_all(DTYPES, aot.TARGETS, jobs=2), strict=True))
