"""Cross entropy from logits, a drop-in for ``torch.nn.functional.cross_entropy`` on ``[..., V]``."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_fast import _dispatch
from rlhf_fast import _validate as v
from rlhf_fast.ops import _custom, fused

REDUCTIONS = ("none", "mean", "sum")


def smoothed_nll(logp: Tensor, mean_logp: Tensor, eps: float) -> Tensor:
    """Per-token cross entropy with label smoothing ``eps``: ``-(1 - eps) log p(label) - eps mean_v log p_v``
    (``mean_logp`` is not read when ``eps == 0``)."""
    return -(1.0 - eps) * logp - eps * mean_logp if eps > 0.0 else -logp


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_backward: bool = False,
    backend=None,
) -> Tensor:
    """Token cross entropy with optional label smoothing, as ``F.cross_entropy(logits.flatten(0, -2), ...)``.

    Per valid token, with ``eps = label_smoothing``:
    ``loss = -(1 - eps) * log p(label) - eps * mean_v log p_v`` (Szegedy et al., 2016);
    ``reduction="mean"`` divides the sum by the number of valid tokens (0, not NaN, when there are
    none), ``"sum"`` sums, ``"none"`` returns ``[...]`` with 0 at ignored positions.

    For ``"mean"``/``"sum"`` the gradient is computed during the forward pass (two passes over the
    logits instead of three). ``inplace_backward=True`` writes it over the logits buffer, so no
    ``[tokens, vocab]`` gradient is allocated: **the logits are destroyed** (their values are the
    gradient afterwards); use it when nothing else needs them.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16; last dim contiguous.
        labels: ``[...]`` int64 or int32 in ``[0, V)`` or ``ignore_index``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``.

    Returns:
        float32: a 0-d loss, or ``[...]`` for ``reduction="none"``.
    """
    v.check_logits(logits)
    v.check_labels(labels, logits)
    ignore_index = v.check_ignore_index(ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    eps = v.check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_inclusive=True)
    backend = _dispatch.resolve(backend, logits.device)
    rows, flat = v.as_rows(logits, allow_copy=not inplace_backward), v.flat_labels(labels)
    smooth = eps > 0.0

    if reduction == "none":
        if inplace_backward:
            raise ValueError("inplace_backward=True needs reduction='mean' or 'sum'")
        logp, _, _, mean_logp = _custom.token_stats_fwd(rows, flat, 1.0, ignore_index, True, False, smooth, backend)
        return smoothed_nll(logp, mean_logp, eps).view(labels.shape)

    valid = (flat != ignore_index).float()
    weight = valid / valid.sum().clamp(min=1) if reduction == "mean" else valid
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    if not needs_grad:
        logp, _, _, mean_logp = _custom.token_stats_fwd(rows, flat, 1.0, ignore_index, True, False, smooth, backend)
    else:
        # d loss / d logp = -(1 - eps) * w, d loss / d mean_logp = -eps * w, per row.
        coefs = torch.stack([-(1.0 - eps) * weight, torch.zeros_like(weight), -eps * weight])
        (logp, _, _, mean_logp), grad = fused.stats_with_gradient(
            logits, rows, flat, 1.0, ignore_index, with_entropy=False, with_mean_logp=smooth, mode=0,
            coefs=coefs, params=[], inplace=inplace_backward, backend=backend,
        )  # fmt: skip
    loss = (smoothed_nll(logp, mean_logp, eps).detach() * weight).sum()
    return fused.attach_gradient(logits, loss, grad) if needs_grad else loss
