"""Shared benchmark helpers: machine facts, timing, copy bandwidth, matmul rate, peak memory, process isolation.

Nothing here knows about a particular op; :mod:`rlhf_fast.bench.run` (and the suites in ``benchmarks/``)
build on it.

Peak memory is read from the kernel, not from an allocator: on Linux, writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` (the process's peak resident set) to the current
``VmRSS``, so after running a function, ``VmHWM - VmHWM_at_reset`` is the largest amount of
memory it made resident at any one moment, whoever allocated it (torch's CPU allocator, glibc,
OpenMP, inductor-generated code). Two things could make the number wrong:

* glibc keeps freed heap memory mapped and resident (its mmap threshold grows to 32 MiB after the
  first large free, and the heap top is only trimmed above a threshold), so blocks freed before
  the reset would be reused during the measured call without raising RSS. ``malloc_trim(0)``
  right before the reset returns every free page of every arena to the kernel, so any reuse
  faults the page back in and is counted (:func:`calibrate_peak_rss` reads 0 without it). We do
  *not* tune the allocator through ``MALLOC_*`` environment variables: timings and memory should
  be those of the default allocator users have, so memory glibc keeps resident after a free
  during the call counts. (Children inherit the environment: ``MALLOC_MMAP_THRESHOLD_=131072``
  gives every block of 128 KiB or more its own mapping, and the figure becomes live bytes only.)
* rlhf_fast's cpp backend keeps freed gradient buffers mapped for the next call
  (``rlhf_fast/buffer_cache.py``); the reset releases them too (``rlhf_fast.empty_cache()``), so the
  measured call maps its gradient afresh and is charged for it, while the timed calls reuse it as a
  training loop would.
* Pages touched for the first time (lazy allocations, code pages, OpenMP thread stacks, compiled
  kernels) would be charged to the op and make the number too large; callers run the function
  once before measuring.

Large torch tensors are ``mmap``-ed by glibc and ``munmap``-ed when freed, so their memory leaves
RSS at once; the measurement runs in a fresh process per case so nothing else is resident.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
# the directory holding the rlhf_fast package: a source checkout's root (git revision known), or site-packages
SOURCE_ROOT = Path(__file__).resolve().parents[2]
_RESULT_TAG = "@@bench-result@@ "


# ---------------------------------------------------------------------------------------------
# machine facts


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(repo: Path = SOURCE_ROOT) -> str:
    """Short HEAD hash, ``+dirty`` when tracked files changed; ``none`` before the first commit or
    outside a git checkout (an installed package: the rows then carry ``rlhf_fast_version``).

    Read-only: ``--no-optional-locks`` keeps ``git status`` from refreshing the index.
    """

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True, check=False
        )

    try:
        # only the checkout whose root holds the package: not a repository site-packages happens to sit in
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo.resolve():
            return "none"
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return "none"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def torch_info() -> dict:
    """Facts about the torch build of *this* process (call it in the process that benchmarks)."""
    import torch

    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def device_name(device: str = "cpu") -> str:
    """What the cases run on: the CPU model and core count, or the CUDA device's name."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return f"{cpu_name()} ({os.cpu_count()} CPUs)"


def machine_info(device: str = "cpu") -> dict:
    from rlhf_fast import __version__

    return {
        "device": device_name(device),
        "python": platform.python_version(),
        "rlhf_fast_version": __version__,
        "git_rev": git_revision(),
    }


def load_average() -> float:
    """1-minute load average (other jobs on the machine make timings noisy)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_s: float
    min_s: float
    times_s: list[float]


L2_FLUSH_BYTES = 256 * MiB  # written before every timed GPU call: more than any GPU's L2 (H100: 50 MiB)


def time_fn(
    fn: Callable[[], object],
    *,
    repeats: int,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
    max_seconds: float | None = None,
    device: str = "cpu",
) -> Timing:
    """Time of ``fn()``; warm-up calls are not timed.

    ``before()``, if given, runs untimed ahead of every call (e.g. to restore inputs that an
    in-place op destroys). With ``max_seconds``, timing stops early once the timed calls add up to
    that much and at least three were made (slow peers need few repeats for a stable median). The
    result of each call is dropped only after the clock stops, so freeing it is not timed.

    CPU: wall time with ``time.perf_counter``. CUDA: the GPU time between two CUDA events recorded
    on the current stream around the call, after an untimed write of ``L2_FLUSH_BYTES`` so the
    inputs are not served from the L2 cache the previous call left warm; the stream is synchronized
    after every call (a call's launch overhead counts, as it does in training).
    """
    timed = _cuda_timed(fn) if device == "cuda" else _wall_timed(fn)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        times.append(timed())
        if max_seconds is not None and len(times) >= 3 and sum(times) >= max_seconds:
            break
    return Timing(statistics.median(times), min(times), times)


def _wall_timed(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        del out
        return elapsed

    return timed


def _cuda_timed(fn: Callable[[], object]) -> Callable[[], float]:
    import torch

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def timed() -> float:
        flush.zero_()  # queued before the start event: untimed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        del out
        return start.elapsed_time(end) / 1e3  # ms -> s

    return timed


def copy_bandwidth(nbytes: int = 512 * MiB, repeats: int = 10, device: str = "cpu") -> tuple[float, Timing]:
    """Memory bandwidth in bytes/s from ``dst.copy_(src)`` on two buffers of ``nbytes`` each.

    A copy reads and writes every byte, so bandwidth = 2 * nbytes / median time. Use buffers far
    larger than the last-level cache; both are touched before timing so no page faults are timed.
    """
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    timing = time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return 2 * nbytes / timing.median_s, timing


class CopySpell:
    """Copy bandwidth sampled between a case's timed calls: ``before = spell.then(before)`` runs one timed
    ``dst.copy_(src)`` of two ``nbytes`` buffers ahead of every call (and of the call's own ``before``);
    ``times_ms()`` are those copies. The machine's speed drifts by tens of percent over minutes, so a floor
    from a bandwidth measured at the start of a run can be off for a case timed half an hour later."""

    def __init__(self, nbytes: int) -> None:
        import torch

        self.nbytes = nbytes
        self._src = torch.ones(nbytes // 4, dtype=torch.float32)
        self._dst = torch.zeros_like(self._src)  # both touched: no page faults in the timed copies
        self._times: list[float] = []

    def then(self, before: Callable[[], object] | None) -> Callable[[], None]:
        def copy_then_before() -> None:
            t0 = time.perf_counter()
            self._dst.copy_(self._src)
            self._times.append(time.perf_counter() - t0)
            if before is not None:
                before()

        return copy_then_before

    def times_ms(self) -> list[float]:
        return [round(t * 1e3, 3) for t in self._times]


def matmul_rate(
    m: int, k: int, n: int, dtype, repeats: int = 5, max_seconds: float = 10.0, device: str = "cpu"
) -> tuple[float, Timing]:
    """Matmul rate in FLOP/s from ``torch.mm(a, b.T, out=c)``: ``a`` [m, k], ``b`` [n, k], ``c`` [m, n].

    The layout of an LM head's forward (``hidden @ weight.T``); ``2 m n k`` FLOPs per call. The
    output buffer is allocated and touched before timing, so neither allocation nor page faults
    are timed; the inputs are random (the rate of a BLAS does not depend on the values).
    """
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    c = torch.zeros(m, n, dtype=dtype, device=device)
    timing = time_fn(lambda: torch.mm(a, b.T, out=c), repeats=repeats, warmup=1, max_seconds=max_seconds, device=device)
    return 2 * m * n * k / timing.median_s, timing


# ---------------------------------------------------------------------------------------------
# peak memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def peak_rss_supported() -> tuple[bool, str]:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
    except (OSError, RuntimeError) as exc:
        return False, f"cannot reset the peak RSS counter ({exc})"
    return True, "VmHWM reset through /proc/self/clear_refs"


class PeakRSS:
    """``with PeakRSS() as m: work()`` then ``m.extra_bytes`` = peak resident bytes above the start.

    See the module docstring for why the number can be trusted. Warm ``work`` up first.
    """

    def __enter__(self) -> PeakRSS:
        from rlhf_fast.buffer_cache import empty_cache

        gc.collect()
        empty_cache()  # idle cached gradient buffers are unmapped, so reusing one counts as new memory
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.start_bytes = _status_bytes("VmHWM")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = _status_bytes("VmHWM")
        self.extra_bytes = self.peak_bytes - self.start_bytes


class PeakCUDA:
    """``with PeakCUDA() as m: work()`` then ``m.extra_bytes`` = peak bytes the caching allocator handed
    out above what was allocated at the start (``torch.cuda.max_memory_allocated`` after a reset)."""

    def __enter__(self) -> PeakCUDA:
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start_bytes = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated()
        self.extra_bytes = self.peak_bytes - self.start_bytes


def calibrate_peak_rss(nbytes: int = 64 * MiB) -> float:
    """Measured peak extra bytes ÷ ``nbytes`` for a tensor of ``nbytes`` that is filled and freed.

    Must be ~1.0: a sanity check that the counter reset works on this kernel and that freed-
    then-reused heap blocks are charged again. (Without the ``malloc_trim`` in :class:`PeakRSS`
    this reads 0.0: the blocks of the warm-up call stay resident in glibc's heap.)
    """
    import torch

    torch.ones(30 * MiB // 4)  # freed at once: raises glibc's mmap threshold, as any big free does

    def work():
        keep = [torch.ones(MiB // 4) for _ in range(nbytes // MiB)]  # 1 MiB blocks, below glibc's
        return sum(t.numel() for t in keep)  # mmap threshold once it has grown: heap-allocated

    work()
    with PeakRSS() as m:
        work()
    return m.extra_bytes / nbytes


# ---------------------------------------------------------------------------------------------
# one case per fresh interpreter


def run_isolated(target: str, spec: dict, *, timeout: float = 900.0, env: dict | None = None) -> dict:
    """Call ``target(spec)`` (``"package.module:function"``, returning a JSON-able dict) in a fresh
    Python process, so cases cannot pollute each other's memory, caches or compiled code.

    The child gets this process's ``sys.path`` (so it imports rlhf_fast, and a ``target`` outside the
    package such as ``benchmarks.trainers_vs_trl``, from where this process did) and its working
    directory. A crash or a timeout becomes ``{"status": "ERROR", "detail": ...}``.
    """
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    worker = "import sys; from rlhf_fast.bench.harness import _child_main; _child_main(sys.argv[1:])"
    cmd = [sys.executable, "-c", worker, target, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "ERROR", "detail": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "ERROR", "detail": f"worker exited with {proc.returncode}: {tail}"}


def _child_main(argv: Sequence[str]) -> None:
    """The worker side of :func:`run_isolated`: ``argv`` = (target, spec as JSON)."""
    target, spec = argv[0], json.loads(argv[1])
    module, func = target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(spec)
    except Exception as exc:  # report, don't crash the whole run
        result = {"status": "ERROR", "detail": f"{type(exc).__name__}: {exc}"}
    print(_RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# output


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table. ``columns``: (header, row key, format spec); missing values print ``-``."""

    def cell(row, key, fmt):
        value = row.get(key)
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        text = format(value, fmt)
        # "-0.0" from a rounding-level negative (e.g. a peak a few kB under the gradient's size)
        negative_zero = isinstance(value, (int, float)) and text.startswith("-") and float(text) == 0
        return text[1:] if negative_zero else text

    body = [[cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    headers = [h for h, _, _ in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells):
        # first column (the name) left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(b) for b in body)])


def write_rows(rows: Sequence[dict], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``rows`` to ``out_dir/stem.csv`` and ``out_dir/stem.json``; returns both paths.

    Rows may have different keys (a skipped case has no timings); list values become
    space-separated cells in the CSV and stay lists in the JSON.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    with open(json_path, "w") as f:
        json.dump(list(rows), f, indent=1)
        f.write("\n")
    return csv_path, json_path
