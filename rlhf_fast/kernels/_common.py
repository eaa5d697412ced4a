"""Launch configurations shared by the Triton kernels, and the test hook that shrinks them.

Every kernel here runs one program per logits row and walks the row in blocks of ``BLOCK_V``
columns. The launchers pick a :class:`KernelConfig` from :data:`CONFIGS` (that list is also what
the ahead-of-time compile test covers), unless a block size is forced:

* ``block_v=`` on any launcher, for one call;
* ``with force_block_v(64): ...``, for every launch inside the ``with`` block. Tests use this to
  make rows of a few hundred columns span several blocks under ``TRITON_INTERPRET=1`` without
  threading a keyword through the public ops.

Nothing here imports triton: ``rlhf_fast.kernels`` stays cheap to import.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def _maxnreg_option(maxnreg: int | None) -> dict[str, int]:
    """``maxnreg`` as a launch keyword when set, except on ROCm builds of PyTorch: Triton's HIP backend has
    no such option and refuses a launch that passes one."""
    return {"maxnreg": maxnreg} if maxnreg and torch.version.hip is None else {}


@dataclass(frozen=True)
class KernelConfig:
    block_v: int  # columns per loop step; a power of two
    num_warps: int
    maxnreg: int | None = None  # registers per thread ptxas may use (PTX .maxnreg); None: its own choice

    def __str__(self) -> str:
        cap = f",maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"BLOCK_V={self.block_v},warps={self.num_warps}{cap}"

    def constexprs(self) -> dict[str, int]:
        """The kernel's block-size arguments."""
        return {"BLOCK_V": self.block_v}

    def launch(self) -> dict[str, int]:
        """The block size, warps and maxnreg (see :func:`_maxnreg_option`): the keyword arguments of a launch."""
        return {**self.constexprs(), "num_warps": self.num_warps, **_maxnreg_option(self.maxnreg)}


@dataclass(frozen=True)
class TileConfig:
    """Launch config of the fused-linear kernels (``linear_token_stats.py``): 2-D tiles of
    ``block_n`` tokens x ``block_v`` vocabulary columns, each a ``tl.dot`` over ``H`` in ``block_h`` steps.
    All three are powers of two >= 16 (``tl.dot``'s minimum)."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # as in KernelConfig

    def __str__(self) -> str:
        cap = f",maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"N{self.block_n}xV{self.block_v}xH{self.block_h},warps={self.num_warps},stages={self.num_stages}{cap}"

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_H": self.block_h}

    def launch(self) -> dict[str, int]:
        """The block sizes, warps, stages and maxnreg (see :func:`_maxnreg_option`): the keyword arguments of a
        launch."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, **_maxnreg_option(self.maxnreg)}
        return {**self.constexprs(), **options}


# Sized for H100/A100-class GPUs. 4096 columns over 8 warps is 16 values per thread per step:
# two (bf16) or four (fp32) 16-byte loads in flight per thread and stream, one cross-warp max
# reduction per 4096 columns, and at most 128 registers per thread (reached by the KL forward and,
# on sm_80, by the token-stats forward and fused kernels with entropy and mean log-prob both on:
# 2 programs of 8 warps per SM), without spills. Vocabularies up to 1024 (toy models, tests) take the small
# config instead of idling most of a 4096 block; left to itself, sm_90's ptxas gives the KL forward there
# 64 registers and spills 12 bytes (its two float64 log-sum-exps), where 72 suffice: the cap of 128 lets it
# take them. tests/test_triton_aot.py compiles every config for sm_80 and sm_90 and checks the loads,
# stores and spills.
CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig(block_v=1024, num_warps=4, maxnreg=128),
    KernelConfig(block_v=4096, num_warps=8),
)

_forced_block_v: int | None = None


@contextlib.contextmanager
def force_block_v(block_v: int) -> Iterator[None]:
    """Make every launch inside the ``with`` block use ``block_v`` columns per step (tests only)."""
    global _forced_block_v
    _check_block_v(block_v)
    previous, _forced_block_v = _forced_block_v, block_v
    try:
        yield
    finally:
        _forced_block_v = previous


def _check_block_v(block_v: int) -> None:
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")


def pick_config(vocab: int, block_v: int | None = None) -> KernelConfig:
    """The config for rows of ``vocab`` columns; ``block_v`` (or :func:`force_block_v`) overrides."""
    block_v = block_v if block_v is not None else _forced_block_v
    if block_v is not None:
        _check_block_v(block_v)
        # Keep ~16 values per thread, as the tuned configs do.
        return KernelConfig(block_v, num_warps=min(8, max(1, block_v // 512)))
    for config in CONFIGS:
        if vocab <= config.block_v:
            return config
    return CONFIGS[-1]


def check_rows(name: str, logits: torch.Tensor) -> tuple[int, int, int]:
    """(A, B, V) of a ``[A, B, V]`` logits view; the kernels rely on a contiguous last dim (any stride when
    V == 1: they never step along it, and PyTorch calls such a view contiguous)."""
    if logits.dim() != 3 or (logits.stride(2) != 1 and logits.shape[2] > 1):
        raise ValueError(
            f"{name} must be a 3-D [A, B, V] view with stride(2) == 1, "
            f"got shape {tuple(logits.shape)} strides {logits.stride()}"
        )
    return logits.shape[0], logits.shape[1], logits.shape[2]


def on_tensor_device(launcher):
    """Run ``launcher`` with the GPU of its first argument (a tensor) as the current CUDA device.

    Triton launches on the current device and its current stream, not on the device of the tensors it is
    given: a reference model on ``cuda:1`` while ``cuda:0`` is current would hand the kernel pointers of
    another device. PyTorch's own ops switch devices this way (a device guard); Python ops must do it."""

    @functools.wraps(launcher)
    def launch(tensor: torch.Tensor, *args, **kwargs):
        if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return launcher(tensor, *args, **kwargs)
        return launcher(tensor, *args, **kwargs)

    return launch


def empty_f32(device: torch.device) -> torch.Tensor:
    """The ``[0]`` float32 placeholder returned for an output that was not asked for."""
    return torch.empty(0, dtype=torch.float32, device=device)


@functools.cache
def unused_f32(device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor to pass for a pointer argument that a switched-off feature never
    touches: a real allocation (the launcher wants a valid device pointer), typed float32 like the
    pointers it stands in for, so that the launch matches the ahead-of-time specs. One per device, made
    once: no kernel reads or writes it, so every launch may share it without an allocation of its own."""
    return torch.empty(1, dtype=torch.float32, device=device)


@functools.cache
def unused_f64(device: torch.device) -> torch.Tensor:
    """``unused_f32`` for the float64 pointers (``entropy_ptr``, see ``aot_spec``)."""
    return torch.empty(1, dtype=torch.float64, device=device)


# Triton's name for each logits dtype, as used in a kernel signature ("*bf16").
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class AotSpec:
    """One kernel specialization, as the launchers would JIT it, for rlhf_fast/kernels/aot.py to compile.

    ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``aligned`` names the arguments the runtime marks divisible by 16 for real
    inputs (data pointers, and strides/sizes of vocabularies like 32000 or 128256). ``variant``
    describes the feature switches for tables; ``rows_read``/``rows_written`` count the ``[V]`` row
    streams the kernel loads/stores per step (what must compile to vector accesses).
    """

    kernel: object  # the @triton.jit object (a JITFunction, or the interpreter's wrapper)
    signature: dict[str, str]
    constexprs: dict[str, object]
    aligned: tuple[str, ...]
    config: KernelConfig | TileConfig
    dtype: str
    rows_read: int
    rows_written: int
    variant: str = ""
    # 2-D operand tiles (hidden, weight) of a tl.dot kernel that must be read with vector loads; such
    # kernels never load logits (rows_read = 0)
    tiles_read: int = 0


def aot_spec(
    kernel: object,
    config: KernelConfig | TileConfig,
    dtype: str,
    *,
    switches: dict[str, bool | int],
    types: dict[str, str],
    rows_read: int,
    rows_written: int,
    index_type: str = "i32",
) -> AotSpec:
    """The spec of ``kernel`` launched with ``config`` and the constexpr ``switches`` (on/off flags,
    or small integers such as a mode; the variant name lists the flags that are on and every integer).

    Argument types follow the kernels' naming: ``*_ptr`` are pointers (``*fp32`` unless ``types``
    says otherwise; ``lse*_ptr`` and ``entropy_ptr`` ``*fp64``, the interface's log-sum-exps and entropies, which
    the launchers type float64 even when switched off), ``*stride*`` are ``index_type``
    (the runtime passes i64 once a stride reaches
    2**31), other scalars ``i32`` unless in ``types``. Pointers, strides and ``V`` are marked
    divisible by 16, as the runtime does for aligned tensors and a vocabulary like 32000.
    """
    constexprs = {**switches, **config.constexprs()}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp64" if name.startswith(("lse", "entropy")) else "*fp32"
        else:
            signature[name] = index_type if "stride" in name else "i32"
    aligned = tuple(n for n in kernel.arg_names if n.endswith("_ptr") or "stride" in n or n == "V")
    # flags that are on by name, integer switches with their value: "mode1+kl_kind3+with_entropy"
    shown = [name.lower() if v is True else f"{name.lower()}{v}" for name, v in switches.items() if v is not False]
    variant = "+".join(shown) or "plain"
    if index_type != "i32":
        variant += f"+{index_type}-strides"
    return AotSpec(kernel, signature, constexprs, aligned, config, dtype, rows_read, rows_written, variant)
