"""Every Triton kernel specialization, compiled ahead of time for sm_80 and sm_90 on this GPU-less box.

The interpreter runs the kernels' arithmetic but forgives what only a real compile sees: type
errors in code paths a test never took, loads that stay scalar, register spills. Each case here
compiles one (kernel, feature switches, launch config, logits dtype) as the launchers would JIT it
for inputs whose pointers are 16-byte aligned and whose vocabulary is a multiple of 16, for one
target, and checks that

* Triton and ptxas compile it;
* the PTX reads every logits row with vector loads (``ld.global.v4.b32``-like, >= 8 bytes per
  thread) that cover the whole block (in both passes of the fused forward+gradient kernel), and
  writes gradient rows the same way; the fused-linear ``tl.dot`` kernels, which load no logits,
  read their hidden and weight tiles with vector loads (16-byte ``cp.async`` to shared memory on the
  tensor-core path) covering at least one H step of both tiles;
* ptxas reports no spill stores or loads.

The criteria are ``aot.problems``, which ``rlhf-fast bench --ptx`` applies too. Registers, spills,
shared/local memory and access widths go to ``record_property`` (``--junitxml``) and into every
assertion message; ``python -m rlhf_fast.kernels.aot`` prints them as a table.
Everything is compiled once per session (``tests/_aot.py``; in a subprocess when this process runs
the interpreter, see ``rlhf_fast/kernels/aot.py``): the row kernels take ~75 s of CPU time with a
cold Triton cache, the 138 fused-linear cases (token stats and the two-head KL) ~2 min more (2.5-5 min of wall time
with the two cores shared by other jobs), ~20 s with a warm cache.
The token-stats kernels are compiled in a chosen subset of their switch combinations (every value of
every switch, the combinations the losses launch, and everything on: see ``aot_specs`` in
``rlhf_fast/kernels/token_stats.py`` and ``rlhf_fast/kernels/token_stats_fused.py``), not the full product; so are the
fused-linear kernels (``rlhf_fast/kernels/linear_token_stats.py``, ``rlhf_fast/kernels/linear_kl.py``).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from rlhf_fast.kernels import aot  # noqa: E402

if not os.path.exists(triton.knobs.nvidia.cuobjdump.path):
    pytest.skip("this triton has no NVIDIA backend tools (ptxas, cuobjdump)", allow_module_level=True)

from _aot import CASES, DTYPES, SPECS  # noqa: E402
from _aot import compiled as compile_once  # noqa: E402


def _case_id(spec, cc) -> str:
    name = spec.kernel.__name__.strip("_").removesuffix("_kernel")
    config = spec.config
    blocks = f"{config.block_n}x{config.block_v}x{config.block_h}" if spec.tiles_read else f"{config.block_v}"
    return f"{name}-{spec.variant}-{spec.dtype}-{blocks}x{config.num_warps}-sm{cc}"


@pytest.fixture(scope="module")
def compiled():
    """AotResult per case; a compile error errors every case, with Triton's or ptxas' message."""
    return compile_once()


@pytest.mark.parametrize(("index", "cc"), CASES, ids=[_case_id(SPECS[i], cc) for i, cc in CASES])
def test_compiles_with_vector_access_and_no_spills(index, cc, compiled, record_property):
    spec, result = SPECS[index], compiled[index, cc]
    assert (result.spec, result.cc) == (spec, cc)
    for key, value in result.row().items():
        record_property(key, value)
    numbers = ", ".join(f"{k}={v}" for k, v in result.row().items())
    found = aot.problems(result)
    assert not found, f"{'; '.join(found)}; {numbers}"


KERNELS = {
    "_token_stats_fwd_kernel",
    "_token_stats_bwd_kernel",
    "_token_stats_fused_kernel",
    "_kl_fwd_kernel",
    "_kl_bwd_kernel",
}
# the fused-linear (tl.dot) kernels, with their own tile configs per dtype
LINEAR_KERNELS = {"_linear_fwd_kernel", "_linear_dh_kernel", "_linear_dw_kernel"}
LINEAR_KL_KERNELS = {"_linear_kl_fwd_kernel", "_linear_kl_dh_kernel", "_linear_kl_dw_kernel"}


def test_every_launch_config_is_covered():
    # The launchers pick from CONFIGS; the AOT cases must cover each of them for each kernel.
    from rlhf_fast.kernels import CONFIGS
    from rlhf_fast.kernels.linear_kl import CONFIGS as LINEAR_KL_CONFIGS
    from rlhf_fast.kernels.linear_token_stats import CONFIGS as LINEAR_CONFIGS

    covered = {(spec.kernel.__name__, spec.config) for spec in SPECS if spec.kernel.__name__ in KERNELS}
    assert {spec.kernel.__name__ for spec in SPECS} == KERNELS | LINEAR_KERNELS | LINEAR_KL_KERNELS
    assert covered == {(name, config) for name in KERNELS for config in CONFIGS}
    for kernels, configs in ((LINEAR_KERNELS, LINEAR_CONFIGS), (LINEAR_KL_KERNELS, LINEAR_KL_CONFIGS)):
        fwd_name, dh_name, dw_name = sorted(kernels, key=lambda n: ("_fwd_" not in n, "_dw_" in n))
        for dtype in DTYPES:
            fwd, dh, dw = configs[dtype]
            dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
            seen = {(s.kernel.__name__, s.config) for s in SPECS if s.kernel.__name__ in kernels and s.dtype == dt}
            assert seen == {(fwd_name, fwd), (dh_name, dh), (dw_name, dw)}


def test_every_switch_value_is_covered_per_dtype():
    # The token-stats kernels are not compiled in the full product of their switches (that would be
    # 12 + 10 + 20 variants per config and dtype); each value of each switch must still be compiled
    # for every dtype (and, by CASES, every target). Integer switches take the values the launchers pass.
    from rlhf_fast.kernels.token_stats_fused import KL_KINDS, MODE_LINEAR, MODE_PPO

    # UPCAST (linear kernels) exists for the interpreter only: never compiled on
    domains = {"MODE": {MODE_LINEAR, MODE_PPO}, "KL_KIND": {0, *KL_KINDS}, "UPCAST": {False}}
    for name in KERNELS | LINEAR_KERNELS | LINEAR_KL_KERNELS:
        for dtype in {spec.dtype for spec in SPECS}:
            specs = [s for s in SPECS if s.kernel.__name__ == name and s.dtype == dtype]
            for switch in specs[0].constexprs.keys() - {"BLOCK_N", "BLOCK_V", "BLOCK_H"}:
                seen = {spec.constexprs[switch] for spec in specs}
                assert seen == domains.get(switch, {False, True}), f"{name} {dtype}: {switch} compiled only as {seen}"


def test_tensor_cores_carry_the_16_bit_products(compiled):
    # aot.problems fails any 16-bit tl.dot kernel that falls back to FMA; beyond that, the kernels whose
    # tiles are 64 tokens or more (all but the two-head KL backward's 16-token tiles, see linear_kl.py)
    # must take sm_90's warpgroup MMA, and the exact float32 dot must stay off the (tf32) tensor cores.
    for (index, cc), result in compiled.items():
        spec = SPECS[index]
        if not spec.tiles_read:
            assert result.mma == "-"
        elif spec.dtype == "fp32":
            assert result.mma == "fma", (spec, cc)
        elif cc == 90 and spec.config.block_n >= 64:
            assert result.mma == "wgmma", (spec, cc)
        else:
            assert result.mma in ("mma", "wgmma"), (spec, cc)
