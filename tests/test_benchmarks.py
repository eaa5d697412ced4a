"""The benchmark runner's cases on tiny shapes, so the benchmark cannot rot.

Each case goes through ``benchmarks.run.measure_case``, the function the runner calls in its worker
processes: the provider's forward+backward, its check against the float64 reference, the memory
measurement and the timing. A case passes only if the check passed (status ``ok``); a provider
that cannot run here (an optional package that is not installed) is skipped with its reason.
"""

import dataclasses
import json

import pytest

from benchmarks import ops, run

TINY = {"tokens": 48, "vocab": 301, "hidden": 24}  # odd sizes; tokens a multiple of ops.SEQS
COMPILING = ("compile", "cce")  # torch.compile on the first call: tens of seconds each
LINEAR = "linear_cross_entropy"


def _spec(op: str, provider: str, dtype: str) -> dict:
    return {
        "op": op, "provider": provider, "dtype": dtype, **TINY, "repeats": 1, "max_seconds": None,
        "seed": 0, "threads": None,
    }  # fmt: skip


def _measure(op: str, provider: str, dtype: str) -> dict:
    result = run.measure_case(_spec(op, provider, dtype))
    if result["status"] == "SKIP":
        pytest.skip(f"{provider} cannot run here: {result['detail']}")
    return result


def _params(op: str, dtypes: tuple[str, ...]):
    for provider in ops.OPS[op].providers:
        for dtype in dtypes:
            marks = [pytest.mark.slow] if provider in COMPILING else []
            if provider in COMPILING and dtype != "float32":
                continue  # one compiled dtype is enough to keep the provider honest
            yield pytest.param(provider, dtype, marks=marks, id=f"{provider}-{dtype}")


@pytest.mark.parametrize(("provider", "dtype"), list(_params(LINEAR, ("float32", "bfloat16"))))
def test_linear_cross_entropy_case(provider, dtype):
    result = _measure(LINEAR, provider, dtype)
    assert result["status"] == "ok", result.get("detail")
    assert {"fwd_err", "hidden_grad_err", "weight_grad_err"} <= result.keys()
    # hidden [N, H] and weight [V, H] gradients in the inputs' dtype
    elem = ops.DTYPE_BYTES[dtype]
    assert result["grad_bytes"] == (TINY["tokens"] + TINY["vocab"]) * TINY["hidden"] * elem
    if provider.startswith("rf-"):
        assert result["out_dtype"] == "float32"


@pytest.mark.parametrize(
    ("op", "provider"),
    [(op, p) for op, spec in ops.OPS.items() if op != LINEAR for p in spec.providers if p not in COMPILING],
)
def test_logits_op_case(op, provider):
    result = _measure(op, provider, "float32")
    assert result["status"] == "ok", result.get("detail")
    inplace = provider.endswith("-inplace")
    assert result["grad_bytes"] == (0 if inplace else ops.logits_bytes(_spec(op, provider, "float32")))


@pytest.mark.parametrize("op", [LINEAR, "cross_entropy"])
def test_wrong_answer_fails(op, monkeypatch):
    """A provider whose loss (and so every gradient) is 0.1% off is a FAIL, not a time."""
    spec = ops.OPS[op]
    right = spec.fn("eager")
    monkeypatch.setitem(ops.OPS, op, dataclasses.replace(spec, fn=lambda provider: lambda c: right(c) * 1.001))
    result = run.measure_case(_spec(op, "eager", "float32"))
    assert result["status"] == "FAIL"
    assert "fwd_err" in result["detail"]


def test_runner_end_to_end(tmp_path, capsys):
    """The runner with a FLOP floor: matmul rate, floor, ratios and memory columns in the rows."""
    argv = [
        "--ops", LINEAR, "--providers", "rf-cpp,eager", "--dtype", "float32", "--repeats", "2",
        "--tokens", str(TINY["tokens"]), "--vocab", str(TINY["vocab"]), "--hidden", str(TINY["hidden"]),
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert run.main(argv) == 0
    assert "matmul rate float32" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    rows = {r["provider"]: r for r in json.loads(json_path.read_text())}
    assert set(rows) == {"rf-cpp", "eager"}
    flops = 6 * TINY["tokens"] * TINY["vocab"] * TINY["hidden"]
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["floor_ms"] == pytest.approx(flops / (row["matmul_GFLOPps"] * 1e9) * 1e3)
        assert row["x_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"])
        assert row["extra_bytes"] == row["peak_delta_bytes"] - row["grad_bytes"]
    assert rows["eager"]["speedup_vs_eager"] == 1.0
