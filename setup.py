"""Builds rlhf_fast._C, the CPU backend (metadata and packages live in pyproject.toml).

The row kernels in csrc/cpu/ are compiled once per CPU capability, as PyTorch compiles its own:
DEFAULT (plain C++), AVX2, AVX512 and AVX512_BF16, each with its own -m flags and -DCPU_CAPABILITY=<name>,
which puts it in its own namespace. csrc/ops.cpp picks one at run time from at::get_cpu_capability(), so
one wheel runs on any x86-64 CPU and ATEN_CPU_CAPABILITY=default|avx2 still forces a slower path.

Without a working C++ toolchain the build warns and installs the pure-Python package, which then
falls back to the 'torch' backend. Set RLHF_FAST_REQUIRE_EXT=1 to make a failed build an error.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import traceback

from setuptools import setup

EXT_NAME = "rlhf_fast._C"
KERNEL_SOURCES = ["csrc/cpu/token_stats.cpp", "csrc/cpu/kl_div.cpp"]
COMMON_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
# The kernels round x = logits / T once and must not let the compiler fuse that into an fma
# (see csrc/cpu/vec_utils.h).
KERNEL_FLAGS = ["-ffp-contract=off"]

# GCC leaves instruction scheduling before register allocation off on x86. Turned on for the AVX2 variant it
# made the row kernels 4-17% faster on an EPYC Zen 1, which splits every 256-bit op in two (forward log-probs
# 1.05 -> 0.87 ns per element and core in float32, backward 1.10 -> 1.00); it changes no result.
AVX2_SCHEDULE = ["-fschedule-insns", "-fsched-pressure"]

# (name, -m flags, at::vec capability). The names are ATen's, the flags those of PyTorch's own kernel builds;
# AVX512_BF16 is ours: the AVX512 variant (at::vec's AVX512 code) plus the bfloat16 conversion
# instructions, chosen at run time only on CPUs that have them (csrc/ops.cpp).
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
CAPABILITIES = [("DEFAULT", [], "DEFAULT")]
if platform.machine().lower() in ("x86_64", "amd64"):
    CAPABILITIES += [
        ("AVX2", ["-mavx2", "-mfma", "-mf16c", *AVX2_SCHEDULE], "AVX2"),
        ("AVX512", AVX512_FLAGS, "AVX512"),
        ("AVX512_BF16", [*AVX512_FLAGS, "-mavx512bf16"], "AVX512"),
    ]


def _warn(message: str) -> None:
    print(f"warning: rlhf_fast: {message}", file=sys.stderr)


def _require_ext() -> bool:
    return os.environ.get("RLHF_FAST_REQUIRE_EXT") == "1"


def _extension_setup():
    """(ext_modules, cmdclass) for setup(), or ([], {}) when the extension cannot be built here."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        _warn(f"torch is not importable ({exc}); building without rlhf_fast._C")
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        _warn(f"no C++ compiler ({compiler!r} not found); building without rlhf_fast._C")
        return [], {}

    class BuildRlhfFastExt(BuildExtension):
        """BuildExtension that first compiles the kernels once per CPU capability."""

        def build_extension(self, ext):
            try:
                self._build_capabilities(ext)
                super().build_extension(ext)
            except Exception:
                if _require_ext():
                    raise
                traceback.print_exc()
                _warn("building rlhf_fast._C failed (see above); CPU ops will use the 'torch' backend")

        def _build_capabilities(self, ext):
            cxx_flags = ext.extra_compile_args["cxx"]
            objects, have = [], []
            # DEFAULT comes first in the link line, so an inline function that several variants
            # emit resolves to its plain copy, never to an AVX-512 one.
            for name, march, vec in CAPABILITIES:
                flags = [*cxx_flags, *KERNEL_FLAGS, *march, f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{vec}"]
                try:
                    objects += self.compiler.compile(
                        KERNEL_SOURCES,
                        output_dir=os.path.join(self.build_temp, name.lower()),
                        include_dirs=ext.include_dirs,
                        extra_postargs={"cxx": flags},
                        depends=ext.depends,
                    )
                except Exception:
                    if name == "DEFAULT" or _require_ext():
                        raise
                    _warn(f"compiler cannot build the {name} kernels; the extension will not use them")
                    continue
                if name != "DEFAULT":
                    have.append(f"-DRLHF_FAST_HAVE_{name}")  # tells ops.cpp the variant exists
            cxx_flags += have
            ext.extra_objects = [*objects, *ext.extra_objects]

    ext = CppExtension(
        EXT_NAME,
        optional=not _require_ext(),  # a failed build leaves no .so to copy for an editable install
        sources=["csrc/ops.cpp", "csrc/buffer_cache.cpp"],
        depends=["csrc/buffer_cache.h", "csrc/cpu/kernels.h", "csrc/cpu/vec_utils.h", *KERNEL_SOURCES],
        extra_compile_args={"cxx": list(COMMON_FLAGS)},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildRlhfFastExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
