"""Losses that are cheap element-wise math on per-sequence or per-token numbers: no kernel needed.

``kl_estimate`` (the k1/k2/k3 estimators of KL from sampled tokens), ``reward_loss``
(Bradley–Terry) and ``ranking_loss`` (InstructGPT's K-way comparisons).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_pair(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    _check_tensor(a, a_name)
    _check_tensor(b, b_name)
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With ``d = ref_logprobs - logprobs``: ``k1 = -d`` (unbiased, high variance, can be negative),
    ``k2 = d**2 / 2`` (biased, low variance), ``k3 = exp(d) - d - 1`` (unbiased and >= 0), following
    J. Schulman, "Approximating KL divergence" (2020).

    Args:
        logprobs, ref_logprobs: same-shape float tensors ``[...]``.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[...]`` in the inputs' dtype, differentiable with respect to both.
    """
    _check_pair(logprobs, "logprobs", ref_logprobs, "ref_logprobs")
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d  # expm1 keeps k3 accurate (and >= 0) when d is tiny


def reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: Tensor | float | None = None) -> Tensor:
    """Bradley–Terry loss of a reward model: ``mean(-logsigmoid(r_chosen - r_rejected - margin))``.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` (any same shape) scalar rewards.
        margin: optional required gap, a float or a tensor of the rewards' shape (Llama 2's margin loss).

    Returns:
        0-d tensor, the mean over the batch.
    """
    _check_pair(chosen_rewards, "chosen_rewards", rejected_rewards, "rejected_rewards")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, Tensor):
            _check_pair(chosen_rewards, "chosen_rewards", margin, "margin")
        elif not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise TypeError(f"margin must be a float, a tensor or None, got {type(margin).__name__}")
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def ranking_loss(rewards: Tensor) -> Tensor:
    """K-way ranking loss of InstructGPT (Ouyang et al., 2022, eq. 1).

    ``rewards[:, i]`` is better than ``rewards[:, j]`` for ``i < j``; the loss is the mean over the
    batch and over all ``K(K-1)/2`` ordered pairs of ``-logsigmoid(r_i - r_j)``. With ``K = 2`` it is
    :func:`reward_loss`.

    Args:
        rewards: ``[B, K]`` float, best response first, ``K >= 2``.

    Returns:
        0-d tensor.
    """
    _check_tensor(rewards, "rewards")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape [B, K] with K >= 2, got {tuple(rewards.shape)}")
    i, j = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1, device=rewards.device)
    return -F.logsigmoid(rewards[:, i] - rewards[:, j]).mean()
