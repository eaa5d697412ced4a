"""Regression-tracking benchmarks for pytest-benchmark, kept out of the normal test run (``testpaths`` is
``tests``)::

    pytest benchmarks --benchmark-only                          # every op x provider x dtype
    pytest benchmarks --benchmark-only -k "cross_entropy and rf-cpp" --benchmark-autosave
    pytest benchmarks --benchmark-only --benchmark-compare      # against the last saved run

Each benchmark is one (op, provider, dtype) case of ``rlhf-fast bench`` in mode ``full`` (forward and
the gradients of every input), set up and checked against the float64 reference exactly as the runner
does (a wrong answer fails the test instead of producing a time), then timed by pytest-benchmark, which
groups the providers of one op and dtype together so its table compares them. The shape is smaller than
the runner's default, for a quick regression signal; ``RLHF_FAST_BENCH_SHAPE=tokens,vocab,hidden``
changes it (default ``1024,32000,512``). Peak memory, floors and ratios to peers are the runner's job.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

from rlhf_fast.bench import ops, run

SHAPE_ENV_VAR = "RLHF_FAST_BENCH_SHAPE"
DTYPES = ("float32", "bfloat16")


def _shape() -> tuple[int, int, int]:
    raw = os.environ.get(SHAPE_ENV_VAR, "1024,32000,512")
    try:
        tokens, vocab, hidden = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{SHAPE_ENV_VAR} must be 'tokens,vocab,hidden' integers, got {raw!r}") from None
    return tokens, vocab, hidden


CASES = [
    pytest.param(op, provider, dtype, id=f"{op}-{provider}-{dtype}")
    for op, spec in ops.OPS.items()
    for provider in spec.providers
    for dtype in DTYPES
]


@pytest.mark.parametrize(("op", "provider", "dtype"), CASES)
def test_full_step(benchmark, op, provider, dtype):
    tokens, vocab, hidden = _shape()
    spec = {"op": op, "provider": provider, "dtype": dtype, "mode": "full", "tokens": tokens, "vocab": vocab,
            "hidden": hidden, "seed": 0, "threads": None}  # fmt: skip
    checked = run.check_case(spec)
    if isinstance(checked, dict):
        if checked["status"] == "SKIP":
            pytest.skip(checked["detail"])
        pytest.fail(f"{op} {provider} {dtype}: {checked['detail']}")
    benchmark.group = f"{op} {dtype} {tokens}x{vocab}" + (f"x{hidden}" if ops.OPS[op].floor.kind == "flops" else "")
    benchmark.extra_info.update(provider=provider, first_call_s=round(checked.result["first_call_s"], 3))
    # an in-place provider's leaves are restored before every call, outside the timing
    benchmark.pedantic(checked.step, setup=checked.restore, rounds=5, iterations=1, warmup_rounds=0)
