"""Benchmark ``rf.token_logprobs`` forward+backward on CPU against eager PyTorch and torch.compile.

    python -m benchmarks.run                      # 4096 tokens x 32000 vocab, float32 and bfloat16
    python -m benchmarks.run --quick              # small shape, few repeats: a smoke test
    python -m benchmarks.run --dtype bf16 --providers rf-cpp,eager --out bench_out

Providers: ``rf-cpp`` and ``rf-torch`` (``rf.token_logprobs(..., backend=...)``), ``eager`` (the
usual ``log_softmax(logits.float()).gather``) and ``compile`` (``torch.compile`` of that same
function). Each (provider, dtype) case runs in a fresh process: it checks forward values and the
gradient against ``rlhf_fast.reference`` in float64 on a sample of rows (a wrong answer is a FAIL,
never a time), measures the peak extra resident memory of one forward+backward, then times
``--repeats`` of them. The floor is the time to move the bytes the op must move, at this machine's
copy bandwidth measured in the same run: read the logits forward, read them again backward, write
the gradient (3 x logits bytes). Method and soundness of the memory figure: ``benchmarks/_harness.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import _harness as h

PROVIDERS = ("rf-cpp", "rf-torch", "eager", "compile")
PEERS = ("eager", "compile")  # what rlhf_fast is compared with
DTYPES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# max |error| / max |reference| against float64 (DESIGN.md numerics rule)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
CHECK_ROWS = 32
LOGIT_SCALE = 3.0  # std of the random logits, about that of a trained LM head's output


def eager_token_logprobs(logits, labels):
    """The usual way: a float32 copy, a [tokens, vocab] log_softmax, a gather."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)


def _provider_fn(name: str):
    """The function ``(logits, labels) -> logp`` of a provider; a str (the reason) if it cannot run."""
    import torch

    if name == "eager":
        return eager_token_logprobs
    if name == "compile":
        return torch.compile(eager_token_logprobs, fullgraph=True, dynamic=False)
    import rlhf_fast as rf

    backend = name.removeprefix("rf-")
    status = rf.backends()[backend]
    if not status.available:
        return status.detail
    return lambda logits, labels: rf.token_logprobs(logits, labels, backend=backend)


def _rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64; inf when ``a`` has a NaN."""
    import torch

    err = (a.double() - b).abs().max().item()
    return float("inf") if err != err else err / max(b.abs().max().item(), torch.finfo(torch.float64).tiny)


def _check(logits, labels, grad_out, logp, grad, tol: float) -> tuple[list[str], dict]:
    """Compare one forward+backward with the float64 reference; returns (problems, errors)."""
    import torch

    import rlhf_fast as rf

    problems = []
    if logp.dtype != torch.float32 or logp.shape != labels.shape:
        problems.append(f"logp is {logp.dtype} {tuple(logp.shape)}, expected float32 {tuple(labels.shape)}")
    if grad.dtype != logits.dtype or grad.shape != logits.shape:
        problems.append(f"grad is {grad.dtype} {tuple(grad.shape)}, expected {logits.dtype} {tuple(logits.shape)}")
    if problems:
        return problems, {}
    if not torch.isfinite(logp).all():
        problems.append("non-finite log-probs")
    if not torch.isfinite(grad).all():
        problems.append("non-finite gradient")

    rows = torch.linspace(0, labels.numel() - 1, min(labels.numel(), CHECK_ROWS)).round().long().unique()
    x = logits.detach()[rows].double().requires_grad_()  # x: [rows, V]
    ref = rf.reference.token_logprobs(x, labels[rows])
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out[rows].double())
    errors = {"fwd_err": _rel_err(logp.detach()[rows], ref), "grad_err": _rel_err(grad[rows], ref_grad)}
    for key, err in errors.items():
        if not err <= tol:
            problems.append(f"{key} {err:.2e} > {tol:.0e}")
    return problems, errors


def measure_token_logprobs(spec: dict) -> dict:
    """One (provider, dtype) case; runs in its own process (see ``_harness.run_isolated``)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {**h.torch_info()}
    fn = _provider_fn(spec["provider"])
    if isinstance(fn, str):
        return {**result, "status": "SKIP", "detail": fn}

    torch.manual_seed(spec["seed"])
    n, v, dtype = spec["tokens"], spec["vocab"], getattr(torch, spec["dtype"])
    logits = torch.randn(n, v, dtype=dtype).mul_(LOGIT_SCALE).requires_grad_()  # [N, V]
    labels = torch.randint(0, v, (n,))  # [N] int64
    grad_out = torch.randn(n)  # [N] float32, != 1 so a wrongly scaled gradient shows

    def step():
        logp = fn(logits, labels)
        (grad,) = torch.autograd.grad(logp, logits, grad_out)
        return logp, grad

    # First call: the warm-up (compiles, allocates lazily) whose answer is checked.
    t0 = time.perf_counter()
    logp, grad = step()
    result["first_call_s"] = time.perf_counter() - t0
    problems, errors = _check(logits, labels, grad_out, logp, grad, TOLERANCE[spec["dtype"]])
    result.update(errors)
    del logp, grad
    if problems:
        return {**result, "status": "FAIL", "detail": "; ".join(problems)}

    supported, why = h.peak_rss_supported()
    if supported:
        with h.PeakRSS() as mem:
            out = step()
        del out
        result["peak_delta_bytes"] = mem.extra_bytes
    else:
        result["memory_detail"] = why
    timing = h.time_fn(step, repeats=spec["repeats"], warmup=0 if supported else 1)
    return {
        **result,
        "status": "ok",
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
        moved = 3 * logits_bytes  # read logits forward, read them backward, write the gradient
        row["logits_bytes"] = logits_bytes
        row["floor_ms"] = moved / bandwidth * 1e3
        if row.get("status") != "ok":
            continue
        row["GBps"] = moved / (row["median_ms"] * 1e-3) / 1e9
        row["x_floor"] = row["median_ms"] / row["floor_ms"]
        if "peak_delta_bytes" in row:
            # the op allocates the logits' gradient itself: one [N, V] tensor in the logits' dtype
            row["extra_bytes"] = row["peak_delta_bytes"] - logits_bytes
            row["peak_delta_MiB"] = row["peak_delta_bytes"] / h.MiB
            row["extra_MiB"] = row["extra_bytes"] / h.MiB
            row["extra_pct"] = 100 * row["extra_bytes"] / logits_bytes
    for dtype in {r["dtype"] for r in rows}:
        peers = [r["median_ms"] for r in rows if r["dtype"] == dtype and r["provider"] in PEERS and "median_ms" in r]
        for row in rows:
            if row["dtype"] == dtype and peers and "median_ms" in row:
                row["speedup_vs_best_peer"] = min(peers) / row["median_ms"]


COLUMNS = [
    ("provider", "provider", "s"),
    ("dtype", "dtype", "s"),
    ("status", "status", "s"),
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
    p.add_argument("--providers", action="append", help=f"comma list of {', '.join(PROVIDERS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 10; --quick: 3)")
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
    if min(args.tokens, args.vocab, args.repeats) < 1:
        p.error("--tokens, --vocab and --repeats must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {**h.machine_info(), "load_avg_1min": h.load_average()}
    print(f"token_logprobs forward+backward, {args.tokens} tokens x {args.vocab} vocab, CPU")
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

    cases = [(d, p) for d in args.dtypes for p in args.providers]
    rows = []
    for i, (dtype, provider) in enumerate(cases, 1):
        spec = {
            "provider": provider, "dtype": dtype, "tokens": args.tokens, "vocab": args.vocab,
            "repeats": args.repeats, "seed": args.seed, "threads": args.threads,
        }  # fmt: skip
        row = {"op": "token_logprobs", "mode": "fwd+bwd", **spec, **info, "copy_bw_GBps": bandwidth / 1e9}
        result = h.run_isolated("benchmarks.run:measure_token_logprobs", spec)
        row.update(result)
        rows.append(row)
        summary = f"{row['median_ms']:.1f} ms" if row["status"] == "ok" else row["status"]
        first = f" (first call {row['first_call_s']:.1f} s)" if "first_call_s" in row else ""
        print(f"  [{i}/{len(cases)}] {provider:<8} {dtype:<8} {summary}{first}", flush=True)
    _derive(rows, bandwidth)

    print()
    print(h.format_table(rows, COLUMNS))
    floors = ", ".join(f"{d} {r['floor_ms']:.1f} ms" for d, r in {r["dtype"]: r for r in rows}.items())
    print(f"floor (3 x logits bytes at copy bandwidth): {floors}")
    print("extra = peak delta - the gradient the op returns; % of the logits' size")
    for row in rows:
        if row["status"] != "ok" or "memory_detail" in row:
            print(f"{row['provider']} {row['dtype']}: {row.get('detail') or row['memory_detail']}")

    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in h.write_rows(rows, args.out, f"token_logprobs-{stamp}"):
            print(f"wrote {path}")
    return 1 if any(r["status"] in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
