"""Ahead-of-time compile of every Triton kernel specialization for real NVIDIA targets, no GPU needed.

Each :class:`~._common.AotSpec` (one per kernel x feature switches x config x dtype, listed by
``aot_specs()`` in the kernel modules) goes through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` with the divisibility hints the
runtime would attach for real inputs (16-byte aligned pointers, strides and vocabulary divisible by
16, as for V = 32000 or 128256). Without those hints every load is scalar. From the result we read:

* the PTX: widths of the global loads/stores, to see that the logits rows are read (and gradients
  written) with vector instructions;
* ``ptxas -v`` on that PTX (the same assembler Triton used for the target; the older bundled
  ``ptxas`` rejects the PTX version Triton 3.9 emits for sm_90a): registers and spill bytes;
* ``cuobjdump --dump-resource-usage`` on the cubin: the same numbers from the binary, plus shared
  and local memory.

Under ``TRITON_INTERPRET=1`` (set before triton was imported) even triton's own library functions
(``tl.sum``, ``tl.max``...) are interpreter objects, and the code generator would run them as Python
on IR values. :func:`compile_all` then does the work in fresh ``python -m`` subprocesses without the
variable, so a test process that interprets kernels can still compile them for real.

    python -m rlhf_fast.kernels.aot                    # table: fp32 and bf16, sm_80 and sm_90
    python -m rlhf_fast.kernels.aot --dtype float16 --ptx-dir /tmp/ptx
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ._common import AotSpec

TARGETS = (80, 90)
AOT_DTYPES = (torch.float32, torch.bfloat16)
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of an AotSpec.dtype


def all_specs(dtypes: tuple[torch.dtype, ...] = AOT_DTYPES) -> list[AotSpec]:
    """Every kernel specialization the launchers of ``token_stats``, ``token_stats_fused``, ``kl_div``,
    ``linear_token_stats`` and ``linear_kl`` may JIT (for the token-stats and linear kernels: every value
    of every switch, see their ``aot_specs``)."""
    from . import kl_div, linear_kl, linear_token_stats, token_stats, token_stats_fused

    modules = (token_stats, token_stats_fused, kl_div, linear_token_stats, linear_kl)
    return [spec for dtype in dtypes for module in modules for spec in module.aot_specs(dtype)]


@dataclass(frozen=True)
class AotResult:
    spec: AotSpec
    cc: int
    registers: int  # per thread, from ptxas -v
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # stack frame bytes
    shared: int  # static shared memory of the kernel (Triton's count; reductions' scratch)
    local: int  # local memory per thread, from the cubin
    widest_load: int  # bytes per thread of the widest vector ld.global (0: none)
    widest_store: int  # bytes per thread of the widest vector st.global (0: none)
    vector_load_bytes: int  # bytes per thread moved by vector (.v2/.v4) ld.global in the PTX
    vector_store_bytes: int
    # the instruction the tl.dot kernels' products run on: "wgmma" (sm_90 warpgroup MMA), "mma" (mma.sync),
    # "fma" (no tensor-core instruction: the exact float32 dot, or a 16-bit dot that missed the tensor
    # cores); "-" for kernels without tl.dot
    mma: str = "-"

    @property
    def name(self) -> str:
        return self.spec.kernel.__name__

    @property
    def stream_bytes(self) -> int:
        """Bytes of one row block per thread: what one stream's loads must cover per loop step."""
        return self.spec.config.block_v * _ITEMSIZE[self.spec.dtype] // (32 * self.spec.config.num_warps)

    def row(self) -> dict[str, object]:
        return {
            "kernel": self.name, "variant": self.spec.variant, "dtype": self.spec.dtype,
            "cc": self.cc, "config": str(self.spec.config), "regs": self.registers,
            "spill_st": self.spill_stores, "spill_ld": self.spill_loads, "shared": self.shared,
            "local": self.local, "vec_ld": self.widest_load, "vec_st": self.widest_store, "mma": self.mma,
        }  # fmt: skip


def problems(result: AotResult) -> list[str]:
    """Why a compiled specialization is not ready for a GPU; empty when it is. The one statement of the
    criteria, shared by ``tests/test_triton_aot.py`` and ``rlhf-fast bench --ptx``:

    * the logits rows are read with vector loads (>= 8 bytes per thread) covering the whole block of each
      row stream the kernel reads per step, and gradient rows are written the same way;
    * a ``tl.dot`` kernel (no logits) reads its hidden and weight tiles with vector loads (16-byte
      ``cp.async`` to shared memory on the tensor-core path) covering one H step of both tiles;
    * a ``tl.dot`` kernel on 16-bit inputs runs its products on the tensor cores (``mma.sync`` or, on
      sm_90, ``wgmma``), not on FMA units;
    * ptxas reports no spill stores or loads, and the cubin uses no local memory.
    """
    spec, found = result.spec, []
    block = result.stream_bytes  # bytes per thread of one row block
    if spec.tiles_read:
        config = spec.config
        step = (config.block_n + config.block_v) * config.block_h * _ITEMSIZE[spec.dtype] // (32 * config.num_warps)
        if result.widest_load < 8:
            found.append("hidden/weight tiles are read with scalar loads")
        elif result.vector_load_bytes < step:
            found.append(f"vector loads cover {result.vector_load_bytes} B/thread, an H step of the tiles needs {step}")
        if _ITEMSIZE[spec.dtype] == 2 and result.mma == "fma":
            found.append("the 16-bit tl.dot runs on FMA units, not on the tensor cores")
    elif result.widest_load < 8:
        found.append("logits rows are read with scalar loads")
    elif result.vector_load_bytes < spec.rows_read * block:
        found.append(
            f"vector loads cover {result.vector_load_bytes} B/thread, {spec.rows_read} row(s) need "
            f"{spec.rows_read * block}: part of the row is read with scalar loads"
        )
    if spec.rows_written:
        if result.widest_store < 8:
            found.append("gradient rows are written with scalar stores")
        elif result.vector_store_bytes < spec.rows_written * block:
            found.append(
                f"vector stores cover {result.vector_store_bytes} B/thread, {spec.rows_written} row(s) need "
                f"{spec.rows_written * block}"
            )
    if result.spill_stores or result.spill_loads:
        found.append(f"registers spill ({result.spill_stores} B stored, {result.spill_loads} B loaded)")
    if result.local:
        found.append(f"the kernel uses {result.local} B of local memory")
    return found


@functools.cache
def jit_function(kernel: object) -> JITFunction:
    """A compilable ``JITFunction`` for ``kernel``, even if it was decorated under the interpreter."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)


def compile_spec(spec: AotSpec, cc: int, ptx_dir: str | None = None) -> AotResult:
    """Compile ``spec`` for ``sm_<cc>`` in this process and measure it (not under the interpreter:
    see :func:`compile_all`). Raises if Triton or ptxas fails. ``ptx_dir``: also save the PTX there."""
    fn = jit_function(spec.kernel)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
    source = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {
        "num_warps": spec.config.num_warps,
        # The JIT's default, stated so Triton 3.9 does not warn that the default will change.
        "enable_fp_fusion": triton.knobs.language.default_fp_fusion,
    }
    if hasattr(spec.config, "num_stages"):  # the tl.dot kernels' software pipelining depth
        options["num_stages"] = spec.config.num_stages
    if getattr(spec.config, "maxnreg", None):
        options["maxnreg"] = spec.config.maxnreg
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    ptx = compiled.asm["ptx"]
    if ptx_dir is not None:
        os.makedirs(ptx_dir, exist_ok=True)
        name = f"{fn.__name__}-{spec.variant}-{spec.dtype}-{spec.config.block_v}x{spec.config.num_warps}"
        with open(os.path.join(ptx_dir, f"{name}-sm{cc}.ptx"), "w") as f:
            f.write(ptx)
    usage = ptxas_usage(ptx, cc)
    cubin = cubin_usage(compiled.asm["cubin"])
    loads = global_access_widths(ptx, "ld") + async_copy_widths(ptx)
    stores = global_access_widths(ptx, "st")
    return AotResult(
        spec=spec, cc=cc,
        registers=usage["registers"], spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
        stack=usage["stack"], shared=compiled.metadata.shared, local=cubin["LOCAL"],
        widest_load=max((w for w, vec in loads if vec), default=0),
        widest_store=max((w for w, vec in stores if vec), default=0),
        vector_load_bytes=sum(w for w, vec in loads if vec), vector_store_bytes=sum(w for w, vec in stores if vec),
        mma=mma_kind(ptx) if spec.tiles_read else "-",
    )  # fmt: skip


# ld.global.v4.b32, ld.global.L1::evict_last.b64, st.global.v2.b16, ...
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")


def global_access_widths(ptx: str, op: str) -> list[tuple[int, bool]]:
    """``(bytes per thread, is_vector)`` for every ``ld.global``/``st.global`` (``op`` = ld/st) in ``ptx``."""
    out = []
    for kind, _, vec, bits in _ACCESS.findall(ptx):
        if kind == op:
            out.append((int(vec or 1) * int(bits) // 8, bool(vec)))
    return out


# cp.async.cg.shared.global [ %r103 + 0 ], [ %rd79 + 0 ], 0x10, %r104;  (the tl.dot kernels' tile loads)
_ASYNC_COPY = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)


def mma_kind(ptx: str) -> str:
    """The matrix instruction of a ``tl.dot`` kernel's PTX: ``wgmma`` if any product is a warpgroup MMA
    (``wgmma.mma_async``, sm_90), else ``mma`` for ``mma.sync``, else ``fma``."""
    if re.search(r"\bwgmma\.mma_async\b", ptx):
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync\b", ptx) else "fma"


def async_copy_widths(ptx: str) -> list[tuple[int, bool]]:
    """``(bytes per thread, is_vector)`` for every global -> shared ``cp.async`` in ``ptx``: how software-
    pipelined ``tl.dot`` operands are read on sm_80+ (a copy of 8 or 16 bytes counts as a vector load)."""
    return [(w, w >= 8) for w in (int(n, 0) for n in _ASYNC_COPY.findall(ptx))]


def ptxas_usage(ptx: str, cc: int) -> dict[str, int]:
    """Registers, spill bytes and stack frame from ``ptxas -v`` (the assembler Triton picks for ``cc``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_aot_") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            check=True, capture_output=True, text=True,
        ).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return {
        "registers": int(registers.group(1)), "stack": int(frame.group(1)),
        "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)),
    }  # fmt: skip


def cubin_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``SHARED``, ``LOCAL``, ``STACK``... of the (single) kernel in ``cubin``, via cuobjdump."""
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_aot_") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    function = out[out.index("Function") :]
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", function)}


def format_table(results: list[AotResult]) -> str:
    """A plain-text table, one line per compiled specialization."""
    rows = [r.row() for r in results]
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def interpreting() -> bool:
    """Whether triton.language was imported under TRITON_INTERPRET=1 (its jit functions are then
    interpreter objects for the rest of the process)."""
    return not isinstance(triton.language.standard.max, JITFunction)


def compile_all(
    dtypes: tuple[torch.dtype, ...] = AOT_DTYPES,
    targets: tuple[int, ...] = TARGETS,
    *,
    jobs: int = 1,
    ptx_dir: str | None = None,
) -> list[AotResult]:
    """:func:`compile_spec` for every spec of :func:`all_specs` and every target, in that order.

    Runs in this process when possible; under the interpreter, or with ``jobs > 1``, in ``jobs``
    subprocesses that do not inherit ``TRITON_INTERPRET``.
    """
    specs = all_specs(dtypes)
    work = [(i, cc) for i in range(len(specs)) for cc in targets]
    if jobs == 1 and not interpreting():
        return [compile_spec(specs[i], cc, ptx_dir) for i, cc in work]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child must import this package the way the parent did (source checkout or installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, "-m", f"{__package__}.aot", "--worker"]
    command += [f"--dtype={_dtype_name(d)}" for d in dtypes] + [f"--cc={cc}" for cc in targets]
    if ptx_dir is not None:
        command.append(f"--ptx-dir={ptx_dir}")
    shards = max(1, jobs)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_aot_") as tmp:
        outs = [os.path.join(tmp, f"shard{k}.json") for k in range(shards)]
        logs = [open(os.path.join(tmp, f"shard{k}.log"), "w+") for k in range(shards)]
        try:
            procs = [
                subprocess.Popen([*command, f"--shard={k}/{shards}", f"--out={outs[k]}"], env=env, stderr=logs[k])
                for k in range(shards)
            ]
            for proc, out, log in zip(procs, outs, logs, strict=True):
                if proc.wait() != 0:
                    log.seek(0)
                    raise RuntimeError(f"AOT compile subprocess failed ({proc.returncode}):\n{log.read()[-4000:]}")
                with open(out) as f:
                    for row in json.load(f):
                        i = row.pop("index")
                        results[i, row["cc"]] = AotResult(spec=specs[i], **row)
        finally:
            for log in logs:
                log.close()
    return [results[key] for key in work]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _worker(specs: list[AotSpec], work: list[tuple[int, int]], ptx_dir: str | None, out: str) -> None:
    rows = []
    for i, cc in work:
        result = compile_spec(specs[i], cc, ptx_dir)
        row = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "spec"}
        rows.append({"index": i, **row})
    with open(out, "w") as f:
        json.dump(rows, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], action="append")
    parser.add_argument("--cc", type=int, choices=TARGETS, action="append")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many subprocesses")
    parser.add_argument("--ptx-dir", help="also write every kernel's PTX here")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype) if args.dtype else AOT_DTYPES
    targets = tuple(args.cc) if args.cc else TARGETS
    if args.worker:
        specs = all_specs(dtypes)
        k, n = map(int, args.shard.split("/"))
        work = [(i, cc) for i in range(len(specs)) for cc in targets][k::n]
        _worker(specs, work, args.ptx_dir, args.out)
        return
    results = compile_all(dtypes, targets, jobs=args.jobs, ptx_dir=args.ptx_dir)
    print(json.dumps([r.row() for r in results], indent=1) if args.json else format_table(results))


if __name__ == "__main__":
    main()
