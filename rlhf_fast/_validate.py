"""Input checks shared by every public op: run once, before any kernel, with errors naming the argument.

Everything here looks only at metadata (dtype, shape, strides, device), so it traces under
``torch.compile`` without a graph break. The one data-dependent check, labels in ``[0, V)``,
runs inside the custom op (``rlhf_fast.ops._custom.check_labels_in_range``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")


def check_labels(labels, logits: Tensor, name: str = "labels", ref_name: str = "logits") -> None:
    """``labels`` of ``logits.shape[:-1]`` (``ref_name`` names ``logits`` in messages: hidden states too)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be int64 or int32, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {ref_name}.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check_same_device(labels, logits, name, ref_name)


def check_same_device(t: Tensor, ref: Tensor, name: str, ref_name: str = "logits") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


# The kernels scale by 1 / T in float32: both must be comfortably inside its range.
TEMPERATURE_RANGE = (1e-30, 1e30)


def check_temperature(temperature) -> float:
    if isinstance(temperature, (Tensor, bool)) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile a temperature that changes between
    # calls arrives as a symbolic float, which comparisons handle and math.isfinite does not.
    low, high = TEMPERATURE_RANGE
    if not (low <= temperature <= high):
        raise ValueError(
            f"temperature must be a number in [{low:g}, {high:g}] (1/T is taken in float32), got {temperature}"
        )
    return temperature


def check_float(name: str, value, low: float, high: float | None = None, *, high_inclusive: bool = False) -> float:
    """A Python number in ``[low, high)`` (``[low, high]`` with ``high_inclusive``; no upper bound if None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    below_high = value < math.inf if high is None else value < high or (high_inclusive and value == high)
    if not (value >= low and below_high):
        bound = f"finite and >= {low}" if high is None else f"in [{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def check_coef(name: str, value) -> float:
    """A finite Python number of either sign (a loss term's weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (-math.inf < value < math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (-(2**63) <= ignore_index < 2**63):
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index


def as_rows(logits: Tensor, *, allow_copy: bool = True) -> Tensor:
    """View ``[..., V]`` logits as ``[A, B, V]`` without copying whenever the strides allow.

    Leading dims merge where they are contiguous with each other; two groups of them is what
    a ``[B, T, V][:, :-1]`` slice needs. A last dim that is not contiguous, or more than two
    unmergeable groups of leading dims, costs a copy; with ``allow_copy=False`` (an in-place backward,
    which must write into the logits' own storage) it is a ``ValueError`` instead.
    """

    def copied(t: Tensor) -> Tensor:
        if not allow_copy:
            raise ValueError(
                "inplace_backward=True needs logits with a contiguous last dim whose leading dims view as "
                f"rows without a copy; got shape {tuple(logits.shape)} and strides {logits.stride()}"
            )
        return t.contiguous()

    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = copied(logits)
    V = logits.shape[-1]
    groups: list[int] = []  # sizes of mergeable runs of leading dims, innermost first
    prev = None  # (stride, size) of the previous, inner, non-trivial dim
    for size, stride in zip(reversed(logits.shape[:-1]), reversed(logits.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if prev is not None and stride == prev[0] * prev[1]:
            groups[-1] *= size
        else:
            groups.append(size)
        prev = (stride, size)
    groups.reverse()
    if len(groups) > 2:
        logits = copied(logits)
        groups = [math.prod(groups)]
    shape = [1] * (2 - len(groups)) + groups
    rows = logits.view(shape[0], shape[1], V)
    if not allow_copy and _rows_overlap(rows):
        raise ValueError(
            "inplace_backward=True needs logits whose rows do not share memory (an expand()ed or other "
            f"overlapping view would get one row's gradient for all); got shape {tuple(logits.shape)} and "
            f"strides {logits.stride()}"
        )
    return rows


def _rows_overlap(rows: Tensor) -> bool:
    """Whether two rows of ``[A, B, V]`` (contiguous last dim) share an element: the two leading dims,
    innermost stride first, must each step past everything the dims inside them span."""
    extent = rows.shape[-1]
    for stride, size in sorted((rows.stride(d), rows.shape[d]) for d in (0, 1) if rows.shape[d] > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def as_rows_pair(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``as_rows`` for two tensors of one shape: both views get the same ``[A, B]`` split."""
    p_rows, q_rows = as_rows(p), as_rows(q)
    if p_rows.shape == q_rows.shape:
        return p_rows, q_rows
    for rows, other in ((p_rows, q_rows), (q_rows, p_rows)):
        try:
            matched = other.view(rows.shape)
        except RuntimeError:  # strides of `other` do not admit this split
            continue
        return (rows, matched) if rows is p_rows else (matched, rows)
    return p_rows, q_rows.contiguous().view(p_rows.shape)


def flat_labels(labels: Tensor) -> Tensor:
    """Labels as the kernels want them: contiguous int64 ``[N]`` (a few bytes per token)."""
    return labels.reshape(-1).to(torch.int64).contiguous()
