"""``rlhf-fast bench --ptx``: the GPU readiness report, made without a GPU.

Every Triton kernel specialization the launchers may JIT (``rlhf_fast.kernels.aot.all_specs``) is
compiled ahead of time for sm_80 and sm_90 with the bundled ptxas, and one line per kernel, switches,
config, dtype and target gives: registers per thread, spill bytes, static shared memory, local memory,
and the widest global load (bytes per thread) on the stream that matters: the logits rows for the
row kernels, the hidden and weight tiles for the fused-linear ``tl.dot`` kernels, and for those the
instruction their products run on (``wgmma``, ``mma.sync`` or plain FMA). The verdict of each
line is :func:`rlhf_fast.kernels.aot.problems`, the same criteria as ``tests/test_triton_aot.py``;
the command exits 1 if any line has one (a spill, local memory, or a streaming loop read or written
with scalar accesses, or a 16-bit ``tl.dot`` that misses the tensor cores).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from rlhf_fast.bench import harness as h

JOBS = 2  # compile subprocesses


def rows(results: Sequence) -> list[dict]:
    """One dict per :class:`~rlhf_fast.kernels.aot.AotResult`: its resource figures, the stream its
    ``vec_ld`` is about (``logits`` or ``tiles``), and ``problems`` (``""`` when ready)."""
    from rlhf_fast.kernels import aot

    out = []
    for result in results:
        row = result.row()
        row["stream"] = "tiles" if result.spec.tiles_read else "logits"
        row["problems"] = "; ".join(aot.problems(result))
        out.append(row)
    return out


COLUMNS = [
    ("kernel", "kernel", "s"),
    ("variant", "variant", "s"),
    ("dtype", "dtype", "s"),
    ("sm", "cc", "d"),
    ("config", "config", "s"),
    ("regs", "regs", "d"),
    ("spill st B", "spill_st", "d"),
    ("spill ld B", "spill_ld", "d"),
    ("shared B", "shared", "d"),
    ("local B", "local", "d"),
    ("stream", "stream", "s"),
    ("widest ld B", "vec_ld", "d"),
    ("widest st B", "vec_st", "d"),
    ("mma", "mma", "s"),
]


def report(table_rows: Sequence[dict]) -> tuple[str, int]:
    """The table and the verdict lines for ``table_rows`` (from :func:`rows`); returns (text, failures)."""
    failing = [r for r in table_rows if r["problems"]]
    lines = [h.format_table(table_rows, COLUMNS), ""]
    for r in failing:
        lines.append(f"FAIL {r['kernel']} {r['variant']} {r['dtype']} sm_{r['cc']} {r['config']}: {r['problems']}")
    kernels = len({r["kernel"] for r in table_rows})
    lines.append(
        f"{len(table_rows)} specializations of {kernels} kernels: "
        + (
            f"{len(failing)} not ready"
            if failing
            else "no spills, no local memory, vector loads and stores, 16-bit products on tensor cores"
        )
    )
    return "\n".join(lines), len(failing)


def main(dtypes: Sequence[str], out: str | None = None) -> int:
    """Compile for every target, print the report; 1 if a specialization has a problem, 2 if the tools are
    missing. ``dtypes``: logits dtypes by name (``float32``...); ``out``: also write the rows there."""
    try:
        import torch
        import triton

        from rlhf_fast.kernels import aot
    except ImportError as exc:
        print(f"--ptx needs triton (pip install 'triton>=3.2'): {exc}", file=sys.stderr)
        return 2
    if not os.path.exists(triton.knobs.nvidia.cuobjdump.path):
        print(f"--ptx needs triton's NVIDIA backend tools (ptxas, cuobjdump); triton {triton.__version__} has none",
              file=sys.stderr)  # fmt: skip
        return 2
    torch_dtypes = tuple(getattr(torch, d) for d in dtypes)
    n = len(aot.all_specs(torch_dtypes)) * len(aot.TARGETS)
    targets = ", ".join(f"sm_{cc}" for cc in aot.TARGETS)
    print(f"compiling {n} Triton kernel specializations ({', '.join(dtypes)}; {targets}) with triton "
          f"{triton.__version__} in {JOBS} processes...", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    table_rows = rows(aot.compile_all(torch_dtypes, aot.TARGETS, jobs=JOBS))
    print(f"compiled in {time.perf_counter() - t0:.0f} s\n")
    text, failures = report(table_rows)
    print(text)
    if out:
        info = h.machine_info()
        stamped = [{**r, "triton_version": triton.__version__, "git_rev": info["git_rev"]} for r in table_rows]
        for path in h.write_rows(stamped, out, f"ptx-{time.strftime('%Y%m%d-%H%M%S')}"):
            print(f"wrote {path}")
    return 1 if failures else 0
