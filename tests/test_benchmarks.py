"""The benchmark runner's cases on tiny shapes, so the benchmark cannot rot.

Each case goes through ``rlhf_fast.bench.run.measure_case``, the function the runner calls in its worker
processes: the provider's forward+backward, its check against the float64 reference, the memory
measurement and the timing. A case passes only if the check passed (status ``ok``); a provider
that cannot run here (an optional package that is not installed) is skipped with its reason.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.bench import cases, ops, run

TINY = {"tokens": 48, "vocab": 301, "hidden": 24}  # odd sizes; tokens a multiple of ops.SEQS
COMPILING = run.COMPILING  # torch.compile on the first call: tens of seconds each
LINEAR = "linear_cross_entropy"
LINEAR_OPS = [op for op, spec in ops.OPS.items() if spec.floor.kind == "flops"]  # hidden and weight in


def _spec(op: str, provider: str, dtype: str, mode: str = "full") -> dict:
    return {
        "op": op, "provider": provider, "dtype": dtype, "mode": mode, **TINY, "repeats": 1, "max_seconds": None,
        "seed": 0, "threads": None,
    }  # fmt: skip


def _measure(op: str, provider: str, dtype: str, mode: str = "full") -> dict:
    result = run.measure_case(_spec(op, provider, dtype, mode))
    if result["status"] == "SKIP":
        pytest.skip(f"{provider} cannot run here: {result['detail']}")
    return result


def _on_cpu(op: str, providers):
    """The providers of ``op`` a CPU can run (the Triton ones are timed on GPUs only; see
    test_providers_follow_the_device)."""
    return [p for p in providers if cases.runs_on(p, "cpu", op) is None]


def _params(op: str, dtypes: tuple[str, ...]):
    for provider in _on_cpu(op, ops.OPS[op].providers):
        for dtype in dtypes:
            marks = [pytest.mark.slow] if provider in COMPILING else []
            if provider in COMPILING and dtype != "float32":
                continue  # one compiled dtype is enough to keep the provider honest
            yield pytest.param(op, provider, dtype, marks=marks, id=f"{op}-{provider}-{dtype}")


@pytest.mark.parametrize(
    ("op", "provider", "dtype"),
    [param for op in LINEAR_OPS for param in _params(op, ("float32", "bfloat16"))],
)
def test_linear_op_case(op, provider, dtype):
    result = _measure(op, provider, dtype)
    assert result["status"] == "ok", result.get("detail")
    assert {"fwd_err", "hidden_grad_err", "weight_grad_err"} <= result.keys()
    # hidden [N, H] and weight [V, H] gradients in the inputs' dtype
    elem = ops.DTYPE_BYTES[dtype]
    assert result["grad_bytes"] == (TINY["tokens"] + TINY["vocab"]) * TINY["hidden"] * elem
    if provider.startswith("rf-"):
        assert result["out_dtype"] == "float32"


@pytest.mark.parametrize(
    ("op", "provider"),
    [
        (op, p)
        for op, spec in ops.OPS.items()
        if op not in LINEAR_OPS
        for p in _on_cpu(op, spec.providers)
        if p not in COMPILING
    ],
)
def test_logits_op_case(op, provider):
    result = _measure(op, provider, "float32")
    assert result["status"] == "ok", result.get("detail")
    inplace = provider.endswith("-inplace")
    assert result["grad_bytes"] == (0 if inplace else ops.logits_bytes(_spec(op, provider, "float32")))


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize(("op", "provider"), [("token_logprobs", "rf-cpp"), ("cross_entropy", "rf-cpp-inplace")])
def test_forward_and_backward_modes(op, provider, mode):
    """fwd and bwd time one half of the step; -inplace restores the logits before every forward, so each
    backward after an untimed forward still sees the op's own gradient (checked on the first step)."""
    result = _measure(op, provider, "float32", mode)
    assert result["status"] == "ok", result.get("detail")
    assert result["timed_calls"] == 1 and result["median_ms"] > 0


@pytest.mark.parametrize("op", [LINEAR, "cross_entropy"])
def test_wrong_answer_fails(op, monkeypatch):
    """A provider whose loss (and so every gradient) is 0.1% off is a FAIL, not a time."""
    spec = ops.OPS[op]
    right = spec.fn("eager")
    monkeypatch.setitem(ops.OPS, op, dataclasses.replace(spec, fn=lambda provider: lambda c: right(c) * 1.001))
    result = run.measure_case(_spec(op, "eager", "float32"))
    assert result["status"] == "FAIL"
    assert "fwd_err" in result["detail"]


@pytest.mark.parametrize("op", list(ops.OPS))
def test_checks_allocate_on_the_device_of_their_case(op, monkeypatch):
    """A check's own tensors follow its case onto a GPU: run under a default device of ``meta``, a check
    that allocates without naming the device mixes devices and raises (an ``--device cuda`` run once did)."""
    spec = ops.OPS[op]

    def check_elsewhere(*args):
        with torch.device("meta"):
            return spec.check(*args)

    monkeypatch.setitem(ops.OPS, op, dataclasses.replace(spec, check=check_elsewhere))
    result = run.measure_case(_spec(op, "eager", "float32"))
    assert result["status"] == "ok", result.get("detail")


def test_which_heads_round_the_logits():
    """The reference rounds a 16-bit head's logits only for a provider whose head does: rlhf_fast's Triton
    kernels keep tl.dot's float32 accumulators on any device; its chunked path widens on CPUs only."""
    from rlhf_fast.ops.linear import widen_gemms

    for device in ("cpu", "cuda"):
        assert not cases.rf_head_rounds_logits("rf-triton", torch.bfloat16, device)
    assert cases.rf_head_rounds_logits("rf-torch", torch.bfloat16, "cuda")
    widens = widen_gemms(torch.bfloat16, torch.device("cpu"))
    assert cases.rf_head_rounds_logits("rf-cpp", torch.bfloat16, "cpu") != widens


def test_cut_cross_entropy_runs_its_kernels_only_where_they_work():
    """CCE's Triton kernels need a GPU and a 16-bit head (their backward asserts one); else its torch.compile
    implementation."""
    from types import SimpleNamespace

    from rlhf_fast.bench.linear_ops import cce_impl

    def head(is_cuda, dtype):
        return SimpleNamespace(is_cuda=is_cuda, dtype=dtype)

    assert cce_impl(head(True, torch.bfloat16)) == cce_impl(head(True, torch.float16)) == "cce"
    assert cce_impl(head(True, torch.float32)) == "torch_compile"
    assert cce_impl(head(False, torch.bfloat16)) == "torch_compile"


def test_float32_tolerance_grows_with_the_vocabulary():
    op = ops.OPS["token_entropy"]
    spec = {"dtype": "float32", "vocab": 32000}
    assert run.tolerance(op, spec) == run.TOLERANCE["float32"]
    assert run.tolerance(op, {**spec, "vocab": 301}) == run.TOLERANCE["float32"]
    assert run.tolerance(op, {**spec, "vocab": 128000}) == pytest.approx(2 * run.TOLERANCE["float32"])
    assert run.tolerance(op, {**spec, "vocab": 128000, "dtype": "bfloat16"}) == run.TOLERANCE["bfloat16"]
    dpo = ops.OPS["dpo_loss"]
    assert run.tolerance(dpo, {**spec, "vocab": 128000}) == pytest.approx(2 * ops.DPO_TOLERANCE["float32"])


def test_runner_end_to_end(tmp_path, capsys):
    """The runner with a FLOP floor over a vocabulary sweep: matmul rate, floor, ratios, memory columns, plots."""
    vocabs = (TINY["vocab"], 2 * TINY["vocab"])
    argv = [
        "--ops", LINEAR, "--providers", "rf-cpp,eager", "--dtype", "float32", "--repeats", "2",
        "--tokens", str(TINY["tokens"]), "--vocab", ",".join(map(str, vocabs)), "--hidden", str(TINY["hidden"]),
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert run.main(argv) == 0
    assert "matmul rate float32" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    rows = {(r["provider"], r["vocab"]): r for r in json.loads(json_path.read_text())}
    assert set(rows) == {(p, v) for p in ("rf-cpp", "eager") for v in vocabs}
    for (_, vocab), row in rows.items():
        assert row["status"] == "ok"
        assert row["mode"] == "full" and row["git_rev"] and row["torch_version"]
        flops = 6 * TINY["tokens"] * vocab * TINY["hidden"]
        assert row["floor_ms"] == pytest.approx(flops / (row["matmul_GFLOPps"] * 1e9) * 1e3)
        assert row["x_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"])
        assert row["extra_bytes"] == row["peak_delta_bytes"] - row["grad_bytes"]
        # each vocabulary size is its own competition
        eager = rows["eager", vocab]["median_ms"]
        assert row["speedup_vs_eager"] == pytest.approx(eager / row["median_ms"])
    assert [p.name for p in tmp_path.glob("*.png")] == [f"{LINEAR}-float32-full.png"]


def test_runner_modes_and_token_sweep(tmp_path):
    """A case per (mode, tokens); floors per mode; extra memory only for the full step."""
    argv = [
        "--ops", "token_logprobs", "--providers", "rf-cpp", "--dtype", "float32", "--repeats", "1",
        "--tokens", f"{TINY['tokens']},{2 * TINY['tokens']}", "--vocab", str(TINY["vocab"]),
        "--mode", "fwd,bwd", "--mode", "full", "--out", str(tmp_path),
    ]  # fmt: skip
    assert run.main(argv) == 0
    (json_path,) = tmp_path.glob("*.json")
    rows = {(r["mode"], r["tokens"]): r for r in json.loads(json_path.read_text())}
    assert set(rows) == {(m, t) for m in ("fwd", "bwd", "full") for t in (TINY["tokens"], 2 * TINY["tokens"])}
    for (mode, _), row in rows.items():
        assert row["status"] == "ok"
        passes = {"fwd": 1, "bwd": 2, "full": 3}[mode]
        # the floor's bandwidth is the case's own: timed copies between its calls, not the run's opening one
        assert len(row["copy_times_ms"]) >= row["timed_calls"]
        bandwidth = 2 * run.COPY_NBYTES / (statistics.median(row["copy_times_ms"]) * 1e-3)
        assert row["floor_GBps"] == pytest.approx(bandwidth / 1e9)
        assert row["floor_ms"] == pytest.approx(passes * ops.logits_bytes(row) / bandwidth * 1e3)
        assert ("extra_bytes" in row) == (mode == "full")
    plots = {p.name for p in tmp_path.glob("*.png")}
    assert plots == {f"token_logprobs-float32-{mode}.png" for mode in ("fwd", "bwd", "full")}


def test_rounds_pool_the_timed_calls_of_each_case(tmp_path):
    """--rounds 2 runs every case twice, interleaved, and reports one row per case over both rounds."""
    argv = [
        "--ops", "token_logprobs", "--providers", "rf-cpp,eager", "--dtype", "float32", "--repeats", "2",
        "--max-seconds", "0", "--tokens", str(TINY["tokens"]), "--vocab", str(TINY["vocab"]), "--rounds", "2",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert run.main(argv) == 0
    (json_path,) = tmp_path.glob("*.json")
    rows = json.loads(json_path.read_text())
    assert sorted(r["provider"] for r in rows) == ["eager", "rf-cpp"]
    for row in rows:
        assert row["status"] == "ok" and row["rounds"] == 2 and row["timed_calls"] == 4
        assert row["median_ms"] == pytest.approx(statistics.median(row["times_ms"]))
        assert row["min_ms"] == min(row["times_ms"])
        assert len(row["copy_times_ms"]) >= 4  # both rounds' copies, pooled as the calls are


def test_merge_rounds_keeps_a_failure():
    ok = {"op": "x", "provider": "p", "dtype": "float32", "mode": "full", "tokens": 8, "vocab": 16, "status": "ok",
          "times_ms": [2.0, 4.0], "median_ms": 3.0, "min_ms": 2.0, "peak_delta_bytes": 10}  # fmt: skip
    failed = {**ok, "status": "FAIL", "detail": "wrong"}
    assert run._merge_rounds([ok, failed]) == [failed]
    (merged,) = run._merge_rounds([ok, {**ok, "times_ms": [1.0, 9.0], "peak_delta_bytes": 30}])
    assert merged["times_ms"] == [1.0, 2.0, 4.0, 9.0] and merged["median_ms"] == 3.0 and merged["min_ms"] == 1.0
    assert merged["peak_delta_bytes"] == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vocab", "32000,lots"], "--vocab takes integers"),
        (["--tokens", "0"], "must be positive"),
        (["--rounds", "0"], "must be positive"),
        (["--mode", "fwd,sideways"], "unknown --mode"),
        (["--ops", "ppo_loss", "--tokens", "100"], "multiples of 8"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_providers_follow_the_device(tmp_path, capsys):
    """On CPU the default providers leave out the GPU-only Triton ones; asked for by name, they are SKIP
    rows that say why. The cpp backend refuses CUDA tensors the same way."""
    assert cases.runs_on("rf-cpp-inplace", "cuda") == "the cpp backend runs on CPU tensors"
    assert "--device cuda" in cases.runs_on("rf-triton", "cpu")
    assert cases.runs_on("rf-triton-inplace", "cuda") is None and cases.runs_on("eager", "cuda") is None
    # Liger-Kernel: its cross entropy kernels are Triton (GPU only), its chunked losses run anywhere
    assert "GPU" in cases.runs_on("liger", "cpu", "cross_entropy")
    assert "GPU" in cases.runs_on("liger", "cpu", "linear_cross_entropy")
    assert cases.runs_on("liger", "cuda", "cross_entropy") is None
    assert cases.runs_on("liger", "cpu", "linear_ppo_loss") is None
    assert cases.overwrites_input("cross_entropy", "liger") and cases.overwrites_input("ppo_loss", "rf-cpp-inplace")
    assert not cases.overwrites_input("linear_dpo_loss", "liger")
    base = ["--ops", "cross_entropy", "--dtype", "float32", "--repeats", "1", "--tokens", str(TINY["tokens"]),
            "--vocab", str(TINY["vocab"]), "--out", str(tmp_path)]  # fmt: skip
    args = run.parse_args(base)
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu":
        assert run.main([*base, "--providers", "rf-cpp,rf-triton-inplace"]) == 0
        (json_path,) = tmp_path.glob("*.json")
        rows = {r["provider"]: r for r in json.loads(json_path.read_text())}
        assert rows["rf-cpp"]["status"] == "ok" and rows["rf-triton-inplace"]["status"] == "SKIP"
        assert "--device cuda" in rows["rf-triton-inplace"]["detail"]
        with pytest.raises(SystemExit):
            run.parse_args([*base, "--device", "cuda"])
        assert "sees no CUDA device" in capsys.readouterr().err


def test_bfloat16_needs_a_gpu_with_bfloat16_arithmetic(monkeypatch, capsys):
    """On a GPU older than sm_80 the default sweep leaves bfloat16 out and says so; asked for, it is an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    base = ["--device", "cuda", "--ops", "cross_entropy"]
    assert run.parse_args(base).dtypes == ["float32"]
    assert "bfloat16 left out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args([*base, "--dtype", "float32,bf16"])
    assert "sm_80" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert run.parse_args(base).dtypes == ["float32", "bfloat16"]


def test_quick_runs_its_cases_in_this_process(tmp_path, monkeypatch):
    """--quick skips the fresh interpreter per case (that alone was two thirds of its three minutes)."""
    real = run.h.run_isolated

    def no_case_workers(target, spec, **kwargs):  # the rate measurements still get their own process
        assert not target.endswith(":measure_case"), "--quick started a worker process for a case"
        return real(target, spec, **kwargs)

    monkeypatch.setattr(run.h, "run_isolated", no_case_workers)
    argv = ["--quick", "--ops", "token_logprobs,cross_entropy", "--providers", "rf-cpp,eager", "--tokens",
            str(TINY["tokens"]), "--vocab", str(TINY["vocab"]), "--out", str(tmp_path)]  # fmt: skip
    assert run.main(argv) == 0
    (json_path,) = tmp_path.glob("*.json")
    rows = json.loads(json_path.read_text())
    assert len(rows) == 4 and all(r["status"] == "ok" and r["dtype"] == "float32" for r in rows)


def test_quick_on_a_gpu_leaves_the_process_after_an_error(tmp_path, monkeypatch):
    """An error may leave the CUDA context unusable (a device-side assert does): the --quick cases after it run
    in fresh processes instead of all reporting the first one's error."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run.h, "device_name", lambda device: "a GPU faked by the test")
    monkeypatch.setattr(run, "_measure_rates", lambda args, info, flop_ops: {("bytes", "float32"): 1e12})
    error, skip = {"status": "ERROR", "detail": "device-side assert"}, {"status": "SKIP", "detail": "fresh"}
    monkeypatch.setattr(run, "_in_worker", lambda spec: calls.append("here") or error)
    monkeypatch.setattr(run.h, "run_isolated", lambda *a, **k: calls.append("fresh") or skip)
    argv = ["--quick", "--device", "cuda", "--ops", "token_logprobs", "--providers", "rf-torch,eager,trl",
            "--out", str(tmp_path)]  # fmt: skip
    run.main(argv)
    assert calls == ["here", "fresh", "fresh"]


def test_a_case_moves_to_a_device_with_its_leaves():
    case = ops.OPS["ppo_loss"].setup(_spec("ppo_loss", "eager", "float32"))
    moved = case.to("cpu")
    assert all(leaf.requires_grad and leaf.is_leaf for leaf in moved.leaves.values())
    assert torch.equal(moved["logits"], case["logits"]) and moved.extra.keys() == case.extra.keys()


def test_pytest_benchmark_suite_checks_and_runs_its_cases():
    """``pytest benchmarks --benchmark-only`` is kept out of the normal run; here it runs once untimed
    (``--benchmark-disable``) at a tiny shape, checked against the reference like the runner's cases."""
    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).resolve().parents[1]
    ids = ["token_logprobs-rf-cpp-float32", "linear_cross_entropy-rf-cpp-bfloat16", "ppo_loss-eager-float32"]
    env = {**os.environ, "RLHF_FAST_BENCH_SHAPE": "64,1000,48"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         *(f"benchmarks/test_ops_benchmark.py::test_full_step[{i}]" for i in ids)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 passed" in done.stdout, done.stdout[-2000:]


def test_entry_points():
    """``python -m rlhf_fast.bench`` is the command; the old ``benchmarks.*`` names are the same modules."""
    from benchmarks import _harness
    from benchmarks import ops as old_ops
    from benchmarks import run as old_run
    from rlhf_fast.bench import harness

    assert (_harness, old_ops, old_run) == (harness, ops, run)
    for module in ("rlhf_fast.bench", "benchmarks.run"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and "--ptx" in proc.stdout, proc.stderr
