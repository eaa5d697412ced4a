"""Benchmark rlhf_fast's ops on CPU against eager PyTorch, torch.compile, TRL and other fused forms.

    rlhf-fast bench                                # every op, full step, 4096 tokens x 32000 vocab, fp32 and bf16
    rlhf-fast bench --quick                        # small shape, float32, no compiled peers: a smoke test
    rlhf-fast bench --ops token_logprobs --vocab 32000,128256 --mode fwd,bwd,full --out bench_out   # + plots
    rlhf-fast bench --ops cross_entropy,ppo_loss --dtype bf16 --providers rf-cpp,eager,compile
    rlhf-fast bench --ops linear_cross_entropy --hidden 1024   # the fused-linear form
    rlhf-fast bench --ptx                          # GPU readiness of the Triton kernels, no GPU needed

(``python -m rlhf_fast.bench`` and ``python -m benchmarks.run`` are the same command.) Ops
(``rlhf_fast/bench/ops.py``): the per-token ``token_logprobs``, ``token_entropy``,
``token_logprobs_and_entropy`` and ``kl_divergence`` (the policy's logits get the gradient, the
reference's do not); the gradient-in-forward losses ``cross_entropy`` (mean) and ``ppo_loss`` (clipped,
k3 KL, entropy bonus, token mean), each also with ``inplace_backward=True`` (provider
``rf-cpp-inplace``); ``dpo_loss`` on the chosen/rejected halves of one ``[2B, T, V]`` output; the
fused-linear ``linear_cross_entropy`` (mean), ``linear_token_logprobs``, ``linear_dpo_loss`` and
``linear_ppo_loss`` (GRPO's loss) from hidden states ``[tokens, hidden]`` and an LM-head weight
``[vocab, hidden]``. Providers: ``rf-cpp`` (and ``rf-torch``), ``eager`` (the usual
``log_softmax(logits.float())`` code) and ``compile`` (``torch.compile`` of that same function); ``trl``
(TRL's ``selective_log_softmax`` / ``entropy_from_logits``, when installed) for the per-token log-probs
and entropy; for ``linear_cross_entropy`` also ``torch-lce`` (``torch.nn.functional.linear_cross_entropy``
on its chunked path) and ``cce`` (Cut Cross-Entropy's ``torch_compile`` implementation, when installed);
``liger`` (Liger-Kernel, when installed) for ``linear_dpo_loss`` and ``linear_ppo_loss`` (its chunked
losses) and, on a GPU, ``cross_entropy`` and ``linear_cross_entropy`` (its Triton kernels).

Each (op, provider, dtype, mode, tokens, vocab) case runs in a fresh process: it checks the output and
the gradients of its inputs against a float64 reference (``rlhf_fast.reference``, ``F.cross_entropy``)
on a sample of rows (a wrong answer is a FAIL, never a time), measures the peak extra resident memory of
one call of the mode, then times ``--repeats`` of them (``--rounds R`` runs the whole list R times,
interleaved, and pools each case's timed calls: on a shared machine whose speed drifts by tens of
percent over minutes, peers measured minutes apart are otherwise not comparable). Modes: ``fwd`` the
forward, ``bwd`` the backward after an untimed forward, ``full`` both. The floor of the ops on logits is
the time to move the bytes the mode must move at this machine's copy bandwidth (full step: 3 x logits
bytes, read forward, read backward, write the gradient; 2 x for the gradient-in-forward losses), on CPU
measured within the case itself, a timed 512 MiB copy before each timed call (column ``copy GB/s``; the
run's opening measurement is printed in the header); the floor of the fused-linear forms is compute,
FLOPs at this machine's matmul rate in the case dtype, or on CPU in float32 when that is faster (a CPU
without bf16/fp16 dot products does a half-precision case's FLOPs fastest on inputs widened to float32)
(full step: 6 x tokens x vocab x hidden for the loss). ``--out`` gets CSV and JSON rows (device,
versions, git revision) and a PNG per op x dtype x mode: time and peak memory against the vocabulary
size. Method and soundness of the memory figure: ``rlhf_fast/bench/harness.py``.

``--device cuda`` (the default when torch sees a GPU) runs the same cases on the GPU: ``rf-triton``
(and ``rf-triton-inplace``) instead of ``rf-cpp``, Cut Cross-Entropy's Triton implementation for 16-bit heads
(its ``torch_compile`` one for float32, which its Triton backward refuses), Liger-Kernel's fused-linear cross
entropy with its weight gradient accumulated in float32 (``accum_dtype``), times from CUDA events with the L2
cache flushed before every call, peak memory from ``torch.cuda.max_memory_allocated``, the floors from the GPU's
own copy bandwidth and matmul rate; bfloat16 only on sm_80 or newer. ``--quick`` measures its cases in the
runner's process until one fails, and then in fresh processes. (Written against the CUDA API, reviewed and
checked against a faked GPU, but not yet run on one: this project has none.)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

from rlhf_fast.bench import harness as h
from rlhf_fast.bench import ops, plots
from rlhf_fast.bench.cases import overwrites_input, rf_head_rounds_logits, runs_on

DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}  # fmt: skip
# max |error| / max |reference| against float64 (DESIGN.md numerics rule)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
PROVIDERS = tuple(dict.fromkeys(p for op in ops.OPS.values() for p in op.providers))
COMPILING = ("compile", "cce", "liger")  # torch.compile on the first call


def tolerance(op: ops.Op, spec: dict) -> float:
    """The largest error ÷ reference magnitude the case may show. float32's is calibrated at a 32000 vocabulary
    and grows like sqrt(vocab / 32000) above it: a float32 sum over V terms errs like sqrt(V) ulps, and at
    256000 eager PyTorch's own entropy is 1.1e-5 / 2.4e-5 (value / gradient) off, not wrong. 16-bit
    tolerances are set by the rounding of the outputs and do not grow."""
    tol = op.tolerance.get(spec["dtype"], TOLERANCE[spec["dtype"]])
    if spec["dtype"] == "float32":
        tol *= max(1.0, (spec["vocab"] / 32000) ** 0.5)
    return tol


def _check_types(case, provider: str, out, grads: dict) -> list[str]:
    """Shapes, dtypes and finiteness. rlhf_fast must return a float32 output; a peer's output dtype
    is its own business (PyTorch's linear_cross_entropy returns a bfloat16 loss for bfloat16 inputs)
    and is recorded in the row instead."""
    import torch

    problems = []
    want = tuple(case.grad_out.shape) if case.grad_out is not None else ()
    if tuple(out.shape) != want or (provider.startswith("rf-") and out.dtype != torch.float32):
        problems.append(f"output is {out.dtype} {tuple(out.shape)}, expected float32 {want}")
    for name, leaf in case.leaves.items():
        grad = grads[name]
        if grad.dtype != leaf.dtype or grad.shape != leaf.shape:
            problems.append(
                f"{name} grad is {grad.dtype} {tuple(grad.shape)}, expected {leaf.dtype} {tuple(leaf.shape)}"
            )
    if problems:
        return problems
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    problems += [f"non-finite {name} gradient" for name, grad in grads.items() if not torch.isfinite(grad).all()]
    return problems


@dataclasses.dataclass
class CheckedCase:
    """A case whose first call (the warm-up) passed its check; ``step()`` is the op's forward and
    ``torch.autograd.grad`` of its output with respect to every leaf, ``restore()`` puts back the
    leaves an in-place provider overwrote."""

    fn: Callable
    case: object
    leaves: list
    step: Callable[[], tuple]
    restore: Callable[[], None]
    result: dict


def check_case(spec: dict) -> CheckedCase | dict:
    """Set up a case and check its first call against the reference: a :class:`CheckedCase`, or the
    finished result row of a case that is skipped (provider not installed) or failed its check."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {**h.torch_info()}
    op = ops.OPS[spec["op"]]
    device = spec.get("device", "cpu")
    why_not = runs_on(spec["provider"], device, spec["op"])
    fn = why_not or op.fn(spec["provider"])
    if isinstance(fn, str):
        return {**result, "status": "SKIP", "detail": fn}

    case = op.setup(spec)  # built on CPU with the seed's generator, so every device sees the same inputs
    if spec["provider"].startswith("rf-"):
        case.head_rounds_logits = rf_head_rounds_logits(spec["provider"], getattr(torch, spec["dtype"]), device)
    if device != "cpu":
        case = case.to(device)
    names, leaves = list(case.leaves), list(case.leaves.values())
    inplace = overwrites_input(spec["op"], spec["provider"])
    pristine = {name: leaf.detach().clone() if inplace else leaf.detach() for name, leaf in case.leaves.items()}

    def restore():
        if inplace:
            with torch.no_grad():
                for name, leaf in case.leaves.items():
                    leaf.copy_(pristine[name])

    def step():
        out = fn(case)
        return out, torch.autograd.grad(out, leaves, case.grad_out)

    # First call: the warm-up (compiles, allocates lazily) whose answer is checked.
    restore()
    t0 = time.perf_counter()
    out, grads = step()
    if device == "cuda":
        torch.cuda.synchronize()  # the kernels' time, not their launches'
    result["first_call_s"] = time.perf_counter() - t0
    grads = dict(zip(names, grads, strict=True))
    result["out_dtype"] = str(out.dtype).removeprefix("torch.")
    problems = _check_types(case, spec["provider"], out, grads)
    if inplace:
        aliased = [name for name in names if grads[name].data_ptr() == case[name].data_ptr()]
        if not problems and aliased != names and spec["provider"].startswith("rf-"):
            problems.append("inplace_backward=True returned a gradient that is not the input's buffer")
        grads = {name: case[name].detach() for name in names}  # what the caller gets: the gradient in the buffer
    # The op returns these gradients (an in-place one is its input's buffer): they are not "extra".
    result["grad_bytes"] = 0 if inplace else sum(g.numel() * g.element_size() for g in grads.values())
    if not problems:
        errors = op.check(case, pristine, out, grads)
        result.update(errors)
        tol = tolerance(op, spec)
        problems += [f"{key} {err:.2e} > {tol:.0e}" for key, err in errors.items() if not err <= tol]
    del out, grads
    if problems:
        return {**result, "status": "FAIL", "detail": "; ".join(problems)}
    return CheckedCase(fn, case, leaves, step, restore, result)


def measure_case(spec: dict) -> dict:
    """One (op, provider, dtype, mode, tokens, vocab) case; runs in its own process (see ``harness.run_isolated``).

    A step is the op's forward and ``torch.autograd.grad`` of its output with respect to every leaf
    of the case. The first step (the warm-up: compiles, allocates lazily) is checked whatever the mode;
    then one call of the mode is measured for peak memory and ``repeats`` of them are timed: ``full``
    a step, ``fwd`` the forward (recording the graph, as in training), ``bwd`` the gradient, each
    repeat after an untimed forward. ``*-inplace`` providers write the gradient over the leaf: every
    call first restores the leaves from pristine copies, untimed, and the check reads the gradient
    from the leaf's buffer itself.
    """
    checked = check_case(spec)
    if isinstance(checked, dict):
        return checked
    result, device = checked.result, spec.get("device", "cpu")
    call, before = _mode_call(spec["mode"], checked.step, checked.fn, checked.case, checked.leaves, checked.restore)
    supported, why = (True, "") if device == "cuda" else h.peak_rss_supported()
    if supported:
        before()
        with h.PeakCUDA() if device == "cuda" else h.PeakRSS() as mem:
            out = call()
        del out
        result["peak_delta_bytes"] = mem.extra_bytes
    else:
        result["memory_detail"] = why
    spell = None
    if device == "cpu" and spec.get("copy_nbytes") and ops.OPS[spec["op"]].floor.kind == "bytes":
        # The copy bandwidth of this case's own minutes: a timed copy before every call, so a slow spell of the
        # machine slows the calls and their floor alike (and the copy leaves no logits in the last-level cache).
        spell = h.CopySpell(spec["copy_nbytes"])
        before = spell.then(before)
    timing = h.time_fn(
        call, repeats=spec["repeats"], warmup=0 if supported else 1, before=before, max_seconds=spec.get("max_seconds"),
        device=device,
    )  # fmt: skip
    if spell is not None:
        result["copy_times_ms"] = spell.times_ms()
    return {
        **result,
        "status": "ok",
        "timed_calls": len(timing.times_s),
        "median_ms": timing.median_s * 1e3,
        "min_ms": timing.min_s * 1e3,
        "times_ms": [round(t * 1e3, 3) for t in timing.times_s],
    }


def _in_worker(spec: dict) -> dict:
    """``measure_case`` in this process (``--quick``: no fresh interpreter per case); an exception becomes
    an ERROR row, as a crashed worker's does."""
    try:
        return measure_case(spec)
    except Exception as exc:  # a case's failure is reported in its row; the run goes on
        return {"status": "ERROR", "detail": f"{type(exc).__name__}: {exc}"}


def _merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per case from its ``--rounds`` runs: the timed calls of all rounds pooled (median and min
    over them), the median peak memory; a case that failed or was skipped in any round keeps that row."""
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(row[k] for k in ("op", "provider", "dtype", "mode", "tokens", "vocab"))
        by_case.setdefault(key, []).append(row)
    merged = []
    for runs in by_case.values():
        bad = [r for r in runs if r["status"] != "ok"]
        if bad or len(runs) == 1:
            merged.append(bad[0] if bad else runs[0])
            continue
        times = sorted(t for r in runs for t in r["times_ms"])
        row = {**runs[0], "rounds": len(runs), "timed_calls": len(times), "times_ms": times}
        row["median_ms"] = statistics.median(times)
        row["min_ms"] = times[0]
        if all("copy_times_ms" in r for r in runs):
            row["copy_times_ms"] = sorted(t for r in runs for t in r["copy_times_ms"])
        peaks = [r["peak_delta_bytes"] for r in runs if "peak_delta_bytes" in r]
        if peaks:
            row["peak_delta_bytes"] = statistics.median(peaks)
        merged.append(row)
    return merged


def _mode_call(mode: str, step, fn, case, leaves: list, restore) -> tuple[Callable[[], object], Callable[[], None]]:
    """(the measured call of ``mode``, what runs untimed before each one); ``step`` is the forward+backward,
    ``fn(case)`` the forward."""
    import torch

    if mode == "full":
        return step, restore
    if mode == "fwd":
        return (lambda: fn(case)), restore
    held = {}

    def forward():
        held.clear()  # drop the previous repeat's graph before building the next
        restore()
        held["out"] = fn(case)

    return (lambda: torch.autograd.grad(held.pop("out"), leaves, case.grad_out)), forward


def measure_copy(spec: dict) -> dict:
    """Copy bandwidth and the peak-RSS self-check; runs in its own process."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    bandwidth, timing = h.copy_bandwidth(spec["nbytes"], repeats=spec["repeats"], device=device)
    supported, why = (False, "CUDA: torch.cuda.max_memory_allocated") if device == "cuda" else h.peak_rss_supported()
    return {
        **h.torch_info(),
        "status": "ok",
        "bandwidth_Bps": bandwidth,
        "copy_median_ms": timing.median_s * 1e3,
        "rss_probe": h.calibrate_peak_rss() if supported else None,
        "rss_detail": why,
    }


def measure_matmul(spec: dict) -> dict:
    """The matmul rate of this machine in the case dtype (see ``harness.matmul_rate``); own process."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rate, timing = h.matmul_rate(
        spec["tokens"], spec["hidden"], spec["vocab"], getattr(torch, spec["dtype"]), repeats=spec["repeats"],
        device=spec.get("device", "cpu"),
    )  # fmt: skip
    return {"status": "ok", "flops_per_s": rate, "matmul_median_ms": timing.median_s * 1e3}


def _derive(rows: list[dict], rates: dict[tuple[str, str], float]) -> None:
    """Add floor, rate, ratios and memory shares to each row, in place.

    ``rates[(kind, dtype)]`` is the machine's rate for a floor of that kind: bytes/s of copy
    bandwidth for ``"bytes"`` (the same for every dtype), FLOP/s of matmul for ``"flops"``.
    """
    for row in rows:
        floor = ops.OPS[row["op"]].floor
        work = floor.amount(row)
        row["logits_bytes"] = ops.logits_bytes(row)
        rate = rates[floor.kind, row["dtype"]]
        if floor.kind == "bytes" and row.get("copy_times_ms"):
            rate = 2 * row["copy_nbytes"] / (statistics.median(row["copy_times_ms"]) * 1e-3)  # this case's spell
        if floor.kind == "bytes":
            row["floor_GBps"] = rate / 1e9
        row["floor_ms"] = work / rate * 1e3
        if row.get("status") != "ok":
            continue
        rate = work / (row["median_ms"] * 1e-3)
        row["GBps" if floor.kind == "bytes" else "GFLOPps"] = rate / 1e9
        row["x_floor"] = row["median_ms"] / row["floor_ms"]
        if "peak_delta_bytes" in row:
            row["peak_delta_MiB"] = row["peak_delta_bytes"] / h.MiB
        if "peak_delta_bytes" in row and row["mode"] == "full":
            # fwd holds no gradient yet and bwd's peak is the gradient itself: "extra" is a full-step figure
            row["extra_bytes"] = row["peak_delta_bytes"] - row["grad_bytes"]
            row["extra_MiB"] = row["extra_bytes"] / h.MiB
            row["extra_pct"] = 100 * row["extra_bytes"] / row["logits_bytes"]
    for key in {_group(r) for r in rows}:
        group = [r for r in rows if _group(r) == key and "median_ms" in r]
        peers = [r for r in group if r["provider"] in ops.PEERS]
        eager = [r["median_ms"] for r in peers if r["provider"] == "eager"]
        # memory against the smallest peer's extra, floored at 1 MiB so a near-zero peer gives no
        # meaningless ratio (compile's extra is ~1 MiB on the logits ops)
        peer_extra = [r["extra_bytes"] for r in peers if "extra_bytes" in r]
        for row in group:
            if peers:
                row["speedup_vs_best_peer"] = min(r["median_ms"] for r in peers) / row["median_ms"]
            if eager:
                row["speedup_vs_eager"] = eager[0] / row["median_ms"]
            if peer_extra and "extra_bytes" in row:
                row["extra_vs_least_peer"] = row["extra_bytes"] / max(min(peer_extra), h.MiB)


def _group(row: dict) -> tuple:
    """The rows that compete with each other: one op, dtype, mode and shape."""
    return row["op"], row["dtype"], row["mode"], row["tokens"], row["vocab"], row["hidden"]


# Bytes of each buffer of the copy-bandwidth measurements: far larger than any last-level cache (this
# machine's is 300 MiB, shared with other tenants).
COPY_NBYTES = 512 * 2**20

COLUMNS = [
    ("op", "op", "s"),
    ("provider", "provider", "s"),
    ("dtype", "dtype", "s"),
    ("mode", "mode", "s"),
    ("tokens", "tokens", "d"),
    ("vocab", "vocab", "d"),
    ("status", "status", "s"),
    ("calls", "timed_calls", "d"),
    ("median ms", "median_ms", ".1f"),
    ("min ms", "min_ms", ".1f"),
    ("floor ms", "floor_ms", ".1f"),
    ("copy GB/s", "floor_GBps", ".1f"),
    ("GB/s", "GBps", ".1f"),
    ("GFLOP/s", "GFLOPps", ".0f"),
    ("x floor", "x_floor", ".2f"),
    ("speed-up vs best peer", "speedup_vs_best_peer", ".2f"),
    ("vs eager", "speedup_vs_eager", ".2f"),
    ("peak delta MiB", "peak_delta_MiB", ".1f"),
    ("extra MiB", "extra_MiB", ".1f"),
    ("extra % logits", "extra_pct", ".2f"),
    ("extra / least peer's", "extra_vs_least_peer", ".3f"),
]


def _csv_list(values: list[str] | None, default: tuple[str, ...]) -> list[str]:
    if not values:
        return list(default)
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _int_list(p: argparse.ArgumentParser, flag: str, values: list[str] | None, default: int) -> list[int]:
    """The integers of a repeatable comma-list option, in order, without repeats."""
    items = _csv_list(values, (str(default),))
    try:
        return list(dict.fromkeys(int(item) for item in items))
    except ValueError:
        p.error(f"{flag} takes integers (a comma list), got {','.join(items)!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf-fast bench", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "--tokens", action="append", help="rows of the logits, a case per value (default 4096; --quick: 512)"
    )
    p.add_argument(
        "--vocab",
        action="append",
        help="vocabulary sizes, e.g. 32000,128256; a case per value (default 32000; --quick: 8192)",
    )
    p.add_argument(
        "--mode",
        action="append",
        help="comma list of fwd (forward only), bwd (backward only, after an untimed forward), full (both) "
        "(default: full)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the cases run (default: cuda when a CUDA device is available, else cpu); on cuda the times "
        "are CUDA-event times with the L2 cache flushed before each call, the memory torch.cuda.max_memory_allocated",
    )
    p.add_argument("--hidden", type=int, help="hidden size H of the linear_* ops (default 1024; --quick: 256)")
    p.add_argument(
        "--dtype",
        action="append",
        help="float32, bfloat16, float16; repeatable or comma list (default: float32,bfloat16; --quick: float32)",
    )
    p.add_argument("--ops", action="append", help=f"comma list of {', '.join(ops.OPS)} (default: all)")
    p.add_argument(
        "--providers",
        action="append",
        help=f"comma list of {', '.join(PROVIDERS)} (default: all; --quick: all but {', '.join(COMPILING)})",
    )
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 10; --quick: 3)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=3.0,
        help="stop timing a case once its timed calls add up to this (at least 3 calls; default 3; 0: no limit)",
    )
    p.add_argument(
        "--case-timeout",
        type=float,
        default=900.0,
        help="seconds a case's process may take (checked first call, memory call, timed calls) before it is "
        "an ERROR row (default 900; a bfloat16 peer on a CPU without bf16 dot products needs more)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list of cases this many times, interleaved, and report each case's median over "
        "all its timed calls: on a shared machine whose speed drifts, every provider then sees the same "
        "slow and fast spells (default 1)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each case (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the CSV and JSON rows and the PNG plots")
    p.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: small shape, few repeats, float32, no compiled peers, every case in one worker "
        "process (a smoke test: its memory figures may carry over from case to case)",
    )
    p.add_argument(
        "--ptx",
        action="store_true",
        help="instead of timing: compile every Triton kernel for sm_80 and sm_90 (in each --dtype) and report "
        "registers, spills, shared memory and load widths; exit 1 on a spill or a scalar streaming loop",
    )
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build sees no CUDA device")
    args.providers_given = args.providers is not None

    args.tokens = _int_list(p, "--tokens", args.tokens, 512 if args.quick else 4096)
    args.vocab = _int_list(p, "--vocab", args.vocab, 8192 if args.quick else 32000)
    args.modes = _csv_list(args.mode, ("full",))
    unknown = [m for m in args.modes if m not in ops.MODES]
    if unknown:
        p.error(f"unknown --mode {unknown}; choose from {list(ops.MODES)}")
    args.modes = list(dict.fromkeys(args.modes))
    args.hidden = args.hidden or (256 if args.quick else 1024)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.copy_repeats = 5 if args.quick else 10
    dtypes = _csv_list(args.dtype, ("float32",) if args.quick else ("float32", "bfloat16"))
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown --dtype {unknown}; choose from {sorted(set(DTYPES.values()))}")
    args.dtypes = list(dict.fromkeys(DTYPES[d] for d in dtypes))
    if args.device == "cuda" and "bfloat16" in args.dtypes and not torch.cuda.is_bf16_supported(False):
        # before sm_80 cuBLAS and tl.dot have no bfloat16: the matmul-rate measurement would end the run
        why = "this GPU has no bfloat16 arithmetic (it needs sm_80 or newer)"
        if args.dtype is not None:
            p.error(f"--dtype bfloat16: {why}")
        args.dtypes.remove("bfloat16")
        print(f"bfloat16 left out: {why}", file=sys.stderr)
    # --quick leaves out the peers that compile on their first call (tens of seconds per case)
    args.providers = _csv_list(args.providers, tuple(p for p in PROVIDERS if not (args.quick and p in COMPILING)))
    unknown = [x for x in args.providers if x not in PROVIDERS]
    if unknown:
        p.error(f"unknown --providers {unknown}; choose from {list(PROVIDERS)}")
    args.ops = _csv_list(args.ops, tuple(ops.OPS))
    unknown = [x for x in args.ops if x not in ops.OPS]
    if unknown:
        p.error(f"unknown --ops {unknown}; choose from {list(ops.OPS)}")
    if min(*args.tokens, *args.vocab, args.hidden, args.repeats, args.rounds) < 1:
        p.error("--tokens, --vocab, --hidden, --repeats and --rounds must be positive")
    if not args.case_timeout > 0:
        p.error("--case-timeout must be positive")
    if any(t % ops.SEQS for t in args.tokens) and {"ppo_loss", "dpo_loss"} & set(args.ops):
        p.error(f"--tokens must be multiples of {ops.SEQS} (ppo_loss and dpo_loss use {ops.SEQS} sequences)")
    return args


def _measure_rates(args, info: dict, flop_ops: list[str]) -> dict[tuple[str, str], float] | None:
    """Copy bandwidth (always) and, for ops with a FLOP floor, the matmul rate per dtype, each in a
    fresh process; printed as they come, torch facts added to ``info``. None if one failed."""
    copy_nbytes = COPY_NBYTES
    copy = h.run_isolated("rlhf_fast.bench.run:measure_copy", {
        "nbytes": copy_nbytes, "repeats": args.copy_repeats, "threads": args.threads, "device": args.device,
    })  # fmt: skip
    if copy.get("status") != "ok":
        print(f"copy-bandwidth measurement failed: {copy.get('detail')}", file=sys.stderr)
        return None
    bandwidth = copy["bandwidth_Bps"]
    info.update(torch_version=copy["torch_version"], cpu_capability=copy["cpu_capability"])
    print(
        f"torch {copy['torch_version']} ({copy['cpu_capability']}), {copy['threads']} threads; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (dst.copy_(src), 2 x {copy_nbytes // h.MiB} MiB)"
    )
    probe = copy["rss_probe"]
    print(
        "peak memory: "
        + (f"probe {probe:.3f} x the bytes allocated (must be ~1)" if probe is not None else copy["rss_detail"])
    )
    rates = {("bytes", dtype): bandwidth for dtype in args.dtypes}
    # one rate per dtype, at the largest shape of the sweep (a BLAS is at its best on big matrices); on CPU
    # float32 too: where a half-precision GEMM is slower than a float32 one (no bf16/fp16 dot products), the
    # FLOPs of a half-precision case are done fastest in float32 on widened inputs, and that is its floor
    tokens, vocab = max(args.tokens), max(args.vocab)
    dtypes = list(args.dtypes) if flop_ops else []
    if dtypes and args.device == "cpu" and "float32" not in dtypes:
        dtypes.append("float32")
    measured = {}
    for dtype in dtypes:
        mm = h.run_isolated("rlhf_fast.bench.run:measure_matmul", {
            "tokens": tokens, "hidden": args.hidden, "vocab": vocab, "dtype": dtype,
            "repeats": args.copy_repeats, "threads": args.threads, "device": args.device,
        })  # fmt: skip
        if mm.get("status") != "ok":
            print(f"matmul-rate measurement failed: {mm.get('detail')}", file=sys.stderr)
            return None
        measured[dtype] = mm["flops_per_s"]
        print(
            f"matmul rate {dtype}: {mm['flops_per_s'] / 1e9:.0f} GFLOP/s (torch.mm [{tokens}, {args.hidden}] x "
            f"[{args.hidden}, {vocab}], {mm['matmul_median_ms']:.0f} ms)"
        )
    for dtype in args.dtypes if dtypes else []:
        rates["flops", dtype] = measured[dtype]
        if args.device == "cpu" and measured["float32"] > measured[dtype]:
            rates["flops", dtype] = measured["float32"]
            print(f"floor rate {dtype}: float32's (faster on this CPU; the inputs widened to float32)")
    return rates


def _listed(values: list) -> str:
    return ",".join(map(str, values))


class _Lines:
    """Progress without tqdm: the per-case lines only."""

    def set_description(self, text: str) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, flush=True)

    def update(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int):
    """A tqdm bar over the cases (on stderr; its ``write`` prints each case's line above it), or plain
    lines when tqdm is not installed (it comes with the ``bench`` extra)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines()
    return tqdm(total=total, unit="case", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """``rlhf-fast bench [...]``: run the cases (or, with ``--ptx``, the GPU readiness report); the exit
    status is 1 if a case failed its check or errored (a kernel is not ready), else 0."""
    args = parse_args(argv)
    if args.ptx:
        from rlhf_fast.bench import ptx

        return ptx.main(args.dtypes, args.out)
    info = {**h.machine_info(args.device), "load_avg_1min": h.load_average(), "device_type": args.device}
    flop_ops = [op for op in args.ops if ops.OPS[op].floor.kind == "flops"]
    shape = f"{_listed(args.tokens)} tokens x {_listed(args.vocab)} vocab"
    shape += f" (x {args.hidden} hidden)" if flop_ops else ""
    print(f"{', '.join(args.ops)} in mode {_listed(args.modes)}, {shape}, {args.device.upper()}")
    print(f"machine: {info['device']}, Python {info['python']}, git {info['git_rev']}")
    if info["load_avg_1min"] > 0.5:
        print(f"warning: load average {info['load_avg_1min']:.2f}; timings share the CPU with other jobs")
    rates = _measure_rates(args, info, flop_ops)
    if rates is None:
        return 1

    cases = [
        (op, dtype, mode, tokens, vocab, provider)
        for op in args.ops for dtype in args.dtypes for mode in args.modes
        for tokens in args.tokens for vocab in args.vocab
        for provider in ops.OPS[op].providers if provider in args.providers
        # a provider of the device's default list, or one asked for by name (then SKIP rows say why not)
        if args.providers_given or runs_on(provider, args.device, op) is None
    ]  # fmt: skip
    rows = []
    progress = _progress(len(cases) * args.rounds)
    in_process_failed = False
    for op, dtype, mode, tokens, vocab, provider in cases * args.rounds:
        spec = {
            "op": op, "provider": provider, "dtype": dtype, "mode": mode, "tokens": tokens, "vocab": vocab,
            "hidden": args.hidden, "repeats": args.repeats, "max_seconds": args.max_seconds or None,
            "seed": args.seed, "threads": args.threads, "device": args.device, "copy_nbytes": COPY_NBYTES,
        }  # fmt: skip
        row = {**spec, **info, "copy_bw_GBps": rates["bytes", dtype] / 1e9}
        if ops.OPS[op].floor.kind == "flops":
            row["matmul_GFLOPps"] = rates["flops", dtype] / 1e9
        progress.set_description(f"{op} {provider} {dtype} {mode} {tokens}x{vocab}")
        if args.quick and not in_process_failed:
            row.update(_in_worker(spec))
            # an error on a GPU may have left this process's CUDA context unusable (a device-side assert
            # does): the cases after it run in fresh processes, so they do not all report the same error
            in_process_failed = args.device == "cuda" and row["status"] == "ERROR"
        else:
            row.update(h.run_isolated("rlhf_fast.bench.run:measure_case", spec, timeout=args.case_timeout))
        rows.append(row)
        summary = f"{row['median_ms']:.1f} ms" if row["status"] == "ok" else row["status"]
        first = f" (first call {row['first_call_s']:.1f} s)" if "first_call_s" in row else ""
        progress.write(f"  {op:<20} {provider:<14} {dtype:<8} {mode:<4} {tokens:>6} x {vocab:<6} {summary}{first}")
        progress.update()
    progress.close()
    rows = _merge_rounds(rows)
    _derive(rows, rates)

    print()
    print(h.format_table(rows, COLUMNS))
    for op in dict.fromkeys(r["op"] for r in rows):
        floor = ops.OPS[op].floor
        rate = "copy bandwidth" if floor.kind == "bytes" else "matmul rate"
        print(f"floor of {op}: {floor.note}; at the {rate}")
    print(
        "extra (full mode) = peak delta - the gradients the op returns (-inplace: none, they are the inputs); "
        "% of the logits' bytes; / the least extra among the peers (at least 1 MiB)"
    )
    for row in rows:
        case = f"{row['op']} {row['provider']} {row['dtype']} {row['mode']} {row['tokens']}x{row['vocab']}"
        if row["status"] != "ok" or "memory_detail" in row:
            print(f"{case}: {row.get('detail') or row.get('memory_detail', '')}")
        elif row["out_dtype"] != "float32":
            print(f"{case}: returns a {row['out_dtype']} output")

    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [*h.write_rows(rows, args.out, f"bench-{stamp}"), *plots.plot_rows(rows, args.out)]
        for path in paths:
            print(f"wrote {path}")
    return 1 if any(r["status"] in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
