"""Benchmark rlhf_fast's ops forward+backward on CPU against eager PyTorch and torch.compile.

    python -m benchmarks.run                      # every op, 4096 tokens x 32000 vocab, float32 and bfloat16
    python -m benchmarks.run --quick              # small shape, few repeats: a smoke test
    python -m benchmarks.run --ops cross_entropy,ppo_loss --dtype bf16 --providers rf-cpp,eager --out bench_out

Ops (``benchmarks/ops.py``): ``token_logprobs``; the gradient-in-forward losses ``cross_entropy``
(mean) and ``ppo_loss`` (clipped, k3 KL, entropy bonus, token mean), each also with
``inplace_backward=True`` (provider ``rf-cpp-inplace``); ``dpo_loss`` on the chosen/rejected halves
of one ``[2B, T, V]`` output. Providers: ``rf-cpp`` (and ``rf-torch`` for ``token_logprobs``),
``eager`` (the usual ``log_softmax(logits.float())`` code) and ``compile`` (``torch.compile`` of
that same function). Each (op, provider, dtype) case runs in a fresh process: it checks the output
and the logits' gradient against a float64 reference (``rlhf_fast.reference``, ``F.cross_entropy``)
on a sample of rows (a wrong answer is a FAIL, never a time), measures the peak extra resident
memory of one forward+backward, then times ``--repeats`` of them. The floor is the time to move the
bytes the op must move, at this machine's copy bandwidth measured in the same run: 3 x logits bytes
(read forward, read backward, write the gradient), 2 x for the gradient-in-forward losses. Method
and soundness of the memory figure: ``benchmarks/_harness.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import _harness as h
from benchmarks import ops

DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# max |error| / max |reference| against float64 (DESIGN.md numerics rule)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
PROVIDERS = tuple(dict.fromkeys(p for op in ops.OPS.values() for p in op.providers))


def _check_types(case, out, grad) -> list[str]:
    import torch

    problems = []
    want = tuple(case.labels.shape) if case.grad_out is not None else ()
    if out.dtype != torch.float32 or tuple(out.shape) != want:
        problems.append(f"output is {out.dtype} {tuple(out.shape)}, expected float32 {want}")
    if grad.dtype != case.logits.dtype or grad.shape != case.logits.shape:
        problems.append(
            f"grad is {grad.dtype} {tuple(grad.shape)}, expected {case.logits.dtype} {tuple(case.logits.shape)}"
        )
    if problems:
        return problems
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    if not torch.isfinite(grad).all():
        problems.append("non-finite gradient")
    return problems


def measure_case(spec: dict) -> dict:
    """One (op, provider, dtype) case; runs in its own process (see ``_harness.run_isolated``).

    ``*-inplace`` providers write the gradient over the logits: every call (the checked one, the
    measured one, each timed repeat) first restores the logits from a pristine copy, untimed, and
    the check reads the gradient from the logits buffer itself.
    """
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {**h.torch_info()}
    op = ops.OPS[spec["op"]]
    fn = op.fn(spec["provider"])
    if isinstance(fn, str):
        return {**result, "status": "SKIP", "detail": fn}

    case = op.setup(spec)
    inplace = spec["provider"].endswith("-inplace")
    pristine = case.logits.detach().clone() if inplace else case.logits.detach()

    def restore():
        if inplace:
            with torch.no_grad():
                case.logits.copy_(pristine)

    def step():
        out = fn(case)
        (grad,) = torch.autograd.grad(out, case.logits, case.grad_out)
        return out, grad

    # First call: the warm-up (compiles, allocates lazily) whose answer is checked.
    restore()
    t0 = time.perf_counter()
    out, grad = step()
    result["first_call_s"] = time.perf_counter() - t0
    problems = _check_types(case, out, grad)
    if inplace and not problems and grad.data_ptr() != case.logits.data_ptr():
        problems.append("inplace_backward=True returned a gradient that is not the logits buffer")
    if inplace:
        grad = case.logits.detach()  # what the caller gets: the gradient written into the buffer
    if not problems:
        errors = op.check(case, pristine, out, grad)
        result.update(errors)
        tol = op.tolerance.get(spec["dtype"], TOLERANCE[spec["dtype"]])
        problems += [f"{key} {err:.2e} > {tol:.0e}" for key, err in errors.items() if not err <= tol]
    del out, grad
    if problems:
        return {**result, "status": "FAIL", "detail": "; ".join(problems)}

    supported, why = h.peak_rss_supported()
    if supported:
        restore()
        with h.PeakRSS() as mem:
            out = step()
        del out
        result["peak_delta_bytes"] = mem.extra_bytes
    else:
        result["memory_detail"] = why
    timing = h.time_fn(
        step, repeats=spec["repeats"], warmup=0 if supported else 1, before=restore, max_seconds=spec.get("max_seconds")
    )
    return {
        **result,
        "status": "ok",
        "timed_calls": len(timing.times_s),
        "median_ms": timing.median_s * 1e3,
        "min_ms": timing.min_s * 1e3,
        "times_ms": [round(t * 1e3, 3) for t in timing.times_s],
    }


def measure_copy(spec: dict) -> dict:
    """Copy bandwidth and the peak-RSS self-check; runs in its own process."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bandwidth, timing = h.copy_bandwidth(spec["nbytes"], repeats=spec["repeats"])
    supported, why = h.peak_rss_supported()
    return {
        **h.torch_info(),
        "status": "ok",
        "bandwidth_Bps": bandwidth,
        "copy_median_ms": timing.median_s * 1e3,
        "rss_probe": h.calibrate_peak_rss() if supported else None,
        "rss_detail": why,
    }


def _derive(rows: list[dict], bandwidth: float) -> None:
    """Add floor, GB/s, ratios and memory shares to each row, in place."""
    for row in rows:
        logits_bytes = row["tokens"] * row["vocab"] * DTYPE_BYTES[row["dtype"]]
        moved = ops.OPS[row["op"]].floor_passes * logits_bytes
        row["logits_bytes"] = logits_bytes
        row["floor_ms"] = moved / bandwidth * 1e3
        if row.get("status") != "ok":
            continue
        row["GBps"] = moved / (row["median_ms"] * 1e-3) / 1e9
        row["x_floor"] = row["median_ms"] / row["floor_ms"]
        if "peak_delta_bytes" in row:
            # The op returns the logits' gradient, one [N, V] tensor in the logits' dtype; with
            # inplace_backward=True that gradient is the logits buffer, so all of the delta is extra.
            gradient = 0 if row["provider"].endswith("-inplace") else logits_bytes
            row["extra_bytes"] = row["peak_delta_bytes"] - gradient
            row["peak_delta_MiB"] = row["peak_delta_bytes"] / h.MiB
            row["extra_MiB"] = row["extra_bytes"] / h.MiB
            row["extra_pct"] = 100 * row["extra_bytes"] / logits_bytes
    for key in {(r["op"], r["dtype"]) for r in rows}:
        group = [r for r in rows if (r["op"], r["dtype"]) == key and "median_ms" in r]
        peers = [r["median_ms"] for r in group if r["provider"] in ops.PEERS]
        for row in group if peers else []:
            row["speedup_vs_best_peer"] = min(peers) / row["median_ms"]


COLUMNS = [
    ("op", "op", "s"),
    ("provider", "provider", "s"),
    ("dtype", "dtype", "s"),
    ("status", "status", "s"),
    ("calls", "timed_calls", "d"),
    ("median ms", "median_ms", ".1f"),
    ("min ms", "min_ms", ".1f"),
    ("GB/s", "GBps", ".1f"),
    ("x floor", "x_floor", ".2f"),
    ("speed-up vs best peer", "speedup_vs_best_peer", ".2f"),
    ("peak delta MiB", "peak_delta_MiB", ".1f"),
    ("extra MiB", "extra_MiB", ".1f"),
    ("extra % logits", "extra_pct", ".2f"),
]


def _csv_list(values: list[str] | None, default: tuple[str, ...]) -> list[str]:
    if not values:
        return list(default)
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--tokens", type=int, help="rows of the logits (default 4096; --quick: 512)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 32000; --quick: 8192)")
    p.add_argument(
        "--dtype",
        action="append",
        help="float32, bfloat16, float16; repeatable or comma list (default: float32,bfloat16)",
    )
    p.add_argument("--ops", action="append", help=f"comma list of {', '.join(ops.OPS)} (default: all)")
    p.add_argument("--providers", action="append", help=f"comma list of {', '.join(PROVIDERS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 10; --quick: 3)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=3.0,
        help="stop timing a case once its timed calls add up to this (at least 3 calls; default 3; 0: no limit)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each case (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the CSV and JSON rows")
    p.add_argument("--quick", action="store_true", help="small shape and few repeats (a smoke test)")
    args = p.parse_args(argv)

    args.tokens = args.tokens or (512 if args.quick else 4096)
    args.vocab = args.vocab or (8192 if args.quick else 32000)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.copy_repeats = 5 if args.quick else 10
    dtypes = _csv_list(args.dtype, ("float32", "bfloat16"))
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown --dtype {unknown}; choose from {sorted(set(DTYPES.values()))}")
    args.dtypes = list(dict.fromkeys(DTYPES[d] for d in dtypes))
    args.providers = _csv_list(args.providers, PROVIDERS)
    unknown = [x for x in args.providers if x not in PROVIDERS]
    if unknown:
        p.error(f"unknown --providers {unknown}; choose from {list(PROVIDERS)}")
    args.ops = _csv_list(args.ops, tuple(ops.OPS))
    unknown = [x for x in args.ops if x not in ops.OPS]
    if unknown:
        p.error(f"unknown --ops {unknown}; choose from {list(ops.OPS)}")
    if min(args.tokens, args.vocab, args.repeats) < 1:
        p.error("--tokens, --vocab and --repeats must be positive")
    if args.tokens % ops.SEQS and {"ppo_loss", "dpo_loss"} & set(args.ops):
        p.error(f"--tokens must be a multiple of {ops.SEQS} (ppo_loss and dpo_loss use {ops.SEQS} sequences)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {**h.machine_info(), "load_avg_1min": h.load_average()}
    print(f"{', '.join(args.ops)} forward+backward, {args.tokens} tokens x {args.vocab} vocab, CPU")
    print(f"machine: {info['device']}, Python {info['python']}, git {info['git_rev']}")
    if info["load_avg_1min"] > 0.5:
        print(f"warning: load average {info['load_avg_1min']:.2f}; timings share the CPU with other jobs")

    copy_nbytes = 512 * h.MiB  # far larger than any last-level cache
    copy = h.run_isolated("benchmarks.run:measure_copy", {
        "nbytes": copy_nbytes, "repeats": args.copy_repeats, "threads": args.threads,
    })  # fmt: skip
    if copy.get("status") != "ok":
        print(f"copy-bandwidth measurement failed: {copy.get('detail')}", file=sys.stderr)
        return 1
    bandwidth = copy["bandwidth_Bps"]
    info.update(torch_version=copy["torch_version"], cpu_capability=copy["cpu_capability"])
    print(
        f"torch {copy['torch_version']} ({copy['cpu_capability']}), {copy['threads']} threads; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (dst.copy_(src), 2 x {copy_nbytes // h.MiB} MiB)"
    )
    probe = copy["rss_probe"]
    print(
        "peak-memory probe: "
        + (f"{probe:.3f} x the bytes allocated (must be ~1)" if probe is not None else copy["rss_detail"])
    )

    cases = [(op, d, p) for op in args.ops for d in args.dtypes for p in ops.OPS[op].providers if p in args.providers]
    rows = []
    for i, (op, dtype, provider) in enumerate(cases, 1):
        spec = {
            "op": op, "provider": provider, "dtype": dtype, "tokens": args.tokens, "vocab": args.vocab,
            "repeats": args.repeats, "max_seconds": args.max_seconds or None, "seed": args.seed,
            "threads": args.threads,
        }  # fmt: skip
        row = {"mode": "fwd+bwd", **spec, **info, "copy_bw_GBps": bandwidth / 1e9}
        result = h.run_isolated("benchmarks.run:measure_case", spec)
        row.update(result)
        rows.append(row)
        summary = f"{row['median_ms']:.1f} ms" if row["status"] == "ok" else row["status"]
        first = f" (first call {row['first_call_s']:.1f} s)" if "first_call_s" in row else ""
        print(f"  [{i}/{len(cases)}] {op:<14} {provider:<14} {dtype:<8} {summary}{first}", flush=True)
    _derive(rows, bandwidth)

    print()
    print(h.format_table(rows, COLUMNS))
    for op in dict.fromkeys(r["op"] for r in rows):
        spec = ops.OPS[op]
        by_dtype = {r["dtype"]: r["floor_ms"] for r in rows if r["op"] == op}
        floors = ", ".join(f"{dtype} {ms:.1f} ms" for dtype, ms in by_dtype.items())
        print(f"floor of {op} ({spec.floor_passes} x logits bytes at copy bandwidth: {spec.floor_note}): {floors}")
    print("extra = peak delta - the gradient the op returns (-inplace: none, it is the logits); % of the logits")
    for row in rows:
        if row["status"] != "ok" or "memory_detail" in row:
            print(f"{row['op']} {row['provider']} {row['dtype']}: {row.get('detail') or row['memory_detail']}")

    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in h.write_rows(rows, args.out, f"bench-{stamp}"):
            print(f"wrote {path}")
    return 1 if any(r["status"] in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
