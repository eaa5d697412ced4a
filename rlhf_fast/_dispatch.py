"""Backend choice, in one place.

CUDA tensors go to ``triton`` (or, when triton cannot be imported, to ``torch``), CPU tensors to ``cpp``
(the compiled ``rlhf_fast._C``) or, when the extension is not built, to ``torch``. ``backend=`` on a
call, or the ``RLHF_FAST_BACKEND`` environment variable, overrides the default; a backend that cannot
run on the given tensors is a ``ValueError``.

Each backend is a module-like object with the four low-level functions of the kernel interface
(``token_stats_fwd``, ``token_stats_bwd``, ``kl_fwd``, ``kl_bwd``); see ``rlhf_fast/ops/_custom.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

BACKEND_NAMES = ("triton", "cpp", "torch")
ENV_VAR = "RLHF_FAST_BACKEND"


class BackendStatus(NamedTuple):
    available: bool
    detail: str


def _load_cpp():
    """Import the C++ extension; returns (module or None, detail)."""
    try:
        _C = importlib.import_module("rlhf_fast._C")
    except ImportError as exc:  # not built (no compiler at install time), or built for another torch
        return None, f"rlhf_fast._C is not built or failed to load ({exc})"
    capability = _C.cpu_capability() if hasattr(_C, "cpu_capability") else "unknown"
    return _C, f"rlhf_fast._C, kernels compiled for {capability}"


_C, _CPP_DETAIL = _load_cpp()
if _C is None:
    warnings.warn(
        f"{_CPP_DETAIL}; CPU tensors fall back to the slower 'torch' backend. "
        "Reinstall with `pip install --no-build-isolation -e .` and a C++ compiler to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton (slow to import); a plain constant also keeps
# resolve() free of cached calls that torch.compile would have to trace.
_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _triton_import_error() -> str | None:
    return _TRITON_ERROR


def backends() -> dict[str, BackendStatus]:
    """Which backends can run here, and why not the others.

    Returns ``{"triton": BackendStatus(available, detail), "cpp": ..., "torch": ...}``.
    """
    triton_error = _triton_import_error()
    if triton_error is not None:
        triton_status = BackendStatus(False, triton_error)
    elif torch.cuda.is_available():
        triton_status = BackendStatus(True, f"CUDA device: {torch.cuda.get_device_name()}")
    elif triton_interpreted():
        triton_status = BackendStatus(True, "no GPU; TRITON_INTERPRET=1 runs kernels on CPU tensors (slow)")
    else:
        triton_status = BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    return {
        "triton": triton_status,
        "cpp": BackendStatus(_C is not None, _CPP_DETAIL),
        "torch": BackendStatus(True, "plain PyTorch, chunked over rows; runs anywhere"),
    }


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend a call on tensors of ``device`` runs on."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None:
        if device.type == "cuda":  # triton is an optional dependency (no wheel on some platforms)
            return "triton" if _triton_import_error() is None else "torch"
        return "cpp" if device.type == "cpu" and _C is not None else "torch"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {backend!r}")
    if backend == "cpp":
        if _C is None:
            raise ValueError(f"backend='cpp' is not available: {_CPP_DETAIL}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
    elif backend == "triton":
        error = _triton_import_error()
        if error is not None:
            raise ValueError(f"backend='triton' is not available: {error}")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "backend='triton' needs CUDA tensors; on CPU tensors it runs only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' cannot run on {device} tensors")
    return backend


class _CppBackend:
    """The C++ kernels, registered by rlhf_fast._C as torch.ops.rlhf_fast_C.*"""

    def __getattr__(self, name):
        return getattr(torch.ops.rlhf_fast_C, name)


class _LazyModules:
    """Functions looked up across modules imported on first use (Triton is heavy to import)."""

    def __init__(self, *modules: str):
        self._modules = modules

    def __getattr__(self, name):
        for module in self._modules:
            mod = importlib.import_module(module)
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(name)


TABLE = {
    "triton": _LazyModules(
        "rlhf_fast.kernels.token_stats", "rlhf_fast.kernels.token_stats_fused", "rlhf_fast.kernels.kl_div"
    ),
    "cpp": _CppBackend(),
    "torch": _LazyModules("rlhf_fast._torch_backend"),
}
