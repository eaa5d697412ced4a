"""The reinforcement-learning arithmetic of the PPO trainer: pure functions on ``[B, T]`` tensors.

Conventions: a batch holds ``B`` sampled responses, right-padded to ``T`` tokens; ``mask`` ``[B, T]``
(bool or float) is 1 on response tokens and 0 on padding, and a row's valid tokens are contiguous
(a prefix of the row for right padding). Position ``t`` is the ``t``-th response token: ``logp[b, t]``
is its log-probability, ``values[b, t]`` the critic's value of the state before it was emitted.
Every function returns float32 and leaves padding at 0.

- :func:`per_token_rewards`: InstructGPT's ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))`` spread over tokens;
- :func:`gae`: generalized advantage estimation (Schulman et al., 2016);
- :func:`whiten`, :func:`masked_mean`, :func:`masked_var`, :func:`explained_variance`;
- :func:`clipped_value_loss`: the critic's PPO-style clipped regression loss;
- :class:`AdaptiveKLController` (Ziegler et al., 2019) and :class:`FixedKLController`: the coefficient beta;
- :func:`group_advantages` (GRPO, RLOO) and :class:`RunningMeanBaseline` (REINFORCE): critic-free baselines.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_fast.ops.policy_losses import LOSS_AGGS, _aggregation_weights

GROUP_KINDS = ("grpo", "rloo")


def _mask_like(mask: Tensor, x: Tensor, name: str = "mask") -> Tensor:
    """``mask`` as float32 of ``x``'s shape and device, or a ``ValueError`` naming it."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != x.shape:
        raise ValueError(f"{name} must have the shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but the values are on {x.device}")
    return mask.to(torch.float32)


def _float(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.float()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum(x * mask) / sum(mask)``: a 0-d float32 tensor (0, not NaN, when ``mask`` is all 0)."""
    x = _float(x, "x")
    m = _mask_like(mask, x)
    return (torch.where(m > 0, x, 0.0) * m).sum() / m.sum().clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``x`` over ``mask``, ``mean((x - mean)^2)``; 0-d float32."""
    mean = masked_mean(x, mask)
    return masked_mean((x.float() - mean).square(), mask)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and population variance over ``mask``.

    With ``shift_mean=False`` the mean is added back: only the scale changes (how rewards are
    whitened, so that their sign keeps its meaning). Padding is 0 in the result.

    Args:
        x: ``[B, T]`` (any shape) floating point; mask: the same shape, 1 on valid entries.

    Returns:
        float32, ``x``'s shape.
    """
    x = _float(x, "x")
    m = _mask_like(mask, x)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m > 0, out, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[returns - values] / Var[returns]`` over ``mask``: 1 for a perfect critic, 0 for one
    that predicts the mean, negative for worse. NaN when the returns have no variance. 0-d float32."""
    values, returns = _float(values, "values"), _float(returns, "returns")
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns


def _last_valid(mask: Tensor) -> Tensor:
    """``[B]`` int64 index of the last valid position of each row; a row without one is an error."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("mask has a row without any valid token: every response needs at least one")
    return (mask.gt(0) * (positions + 1)).argmax(-1)


def per_token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards of the KL-penalized objective ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``.

    ``rewards[b, t] = -kl_coef * (logp[b, t] - ref_logp[b, t])`` (the k1 estimate, whose sum over the
    response is an unbiased estimate of the sequence KL), plus ``score[b]`` at the last valid token.

    Args:
        score: ``[B]`` sequence scores (the reward model's scalar, or a reward function's value).
        logp, ref_logp: ``[B, T]`` log-probs of the sampled tokens under the rollout and reference policies.
        mask: ``[B, T]``, 1 on response tokens; every row needs at least one.
        kl_coef: beta >= 0.

    Returns:
        ``[B, T]`` float32, 0 on padding.
    """
    logp, ref_logp, score = _float(logp, "logp"), _float(ref_logp, "ref_logp"), _float(score, "score")
    m = _mask_like(mask, logp)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if score.shape != logp.shape[:1]:
        raise ValueError(f"score must have shape [B] = ({logp.shape[0]},), got {tuple(score.shape)}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef must be a float >= 0, got {kl_coef!r}")
    rewards = torch.where(m > 0, -kl_coef * (logp - ref_logp), 0.0)
    last = _last_valid(m)
    return rewards.index_put((torch.arange(len(score), device=score.device), last), score, accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over right-padded responses.

    With ``m`` the mask and the value after the last token taken as 0 (the episode ends there)::

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        returns_t = A_t + V_t

    computed backwards over ``t``. ``lam = 1`` gives Monte-Carlo advantages ``G_t - V_t``, ``lam = 0``
    the one-step TD error.

    Args:
        rewards, values: ``[B, T]`` floating point (per-token rewards, critic values); mask: ``[B, T]``.
        gamma: discount in ``[0, 1]``; lam: GAE's lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32, 0 on padding, without gradient.
    """
    rewards, values = _float(rewards, "rewards").detach(), _float(values, "values").detach()
    if values.shape != rewards.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards and values must both be [B, T], got {tuple(rewards.shape)} and {tuple(values.shape)}"
        )
    m = _mask_like(mask, rewards)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    rewards, values = rewards * m, values * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        # at a padded position both are 0, so the last valid token sees V = A = 0 after it
        next_value, next_adv = values[:, t], adv
    return advantages, (advantages + values) * m


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    *,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, Tensor]:
    """The critic's clipped regression loss of PPO, per valid token::

        v_clip = old_values + clip(values - old_values, -cliprange_value, cliprange_value)
        loss_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)

    reduced as :func:`rlhf_fast.ppo_loss` reduces its loss (``loss_agg``: ``token-mean`` over all
    valid tokens, ``seq-mean-token-mean`` or ``seq-mean-token-sum``).

    Args:
        values: ``[B, T]`` current critic values (differentiable); old_values: ``[B, T]`` the values at
            rollout time; returns: ``[B, T]`` targets (from :func:`gae`); mask: ``[B, T]``.
        cliprange_value: how far a value may move from ``old_values`` before the clipped branch binds.
        loss_agg: the reduction, as in :func:`rlhf_fast.ppo_loss`.

    Returns:
        ``(loss, clip_frac)``: 0-d float32; ``clip_frac`` is the share of valid tokens where the clipped
        branch is the larger one (detached).
    """
    values = _float(values, "values")
    old_values, returns = _float(old_values, "old_values"), _float(returns, "returns")
    if not old_values.shape == returns.shape == values.shape:
        raise ValueError(
            f"values, old_values and returns must have one shape, got {tuple(values.shape)}, "
            f"{tuple(old_values.shape)} and {tuple(returns.shape)}"
        )
    if isinstance(cliprange_value, bool) or not isinstance(cliprange_value, (int, float)) or not cliprange_value > 0:
        raise ValueError(f"cliprange_value must be a float > 0, got {cliprange_value!r}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    m = _mask_like(mask, values)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    loss_unclipped = (values - returns).square()
    loss_clipped = (clipped - returns).square()
    per_token = torch.where(m > 0, torch.maximum(loss_unclipped, loss_clipped), 0.0)
    loss = 0.5 * (per_token * _aggregation_weights(m, loss_agg)).sum()
    clip_frac = masked_mean((loss_clipped > loss_unclipped).float(), m).detach()
    return loss, clip_frac


def group_advantages(
    rewards: Tensor, k: int, *, kind: str = "grpo", scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Sequence advantages from a baseline made of the other samples of the same prompt.

    ``rewards`` holds ``P`` groups of ``k`` samples, each group contiguous (``[P * k]``, the samples of
    prompt ``p`` at ``p*k .. p*k + k - 1``). Per group, with mean ``mu`` and standard deviation ``s``
    (``k - 1`` in the denominator):

    - ``grpo`` (Shao et al., 2024): ``A_i = r_i - mu``, divided by ``s + eps`` with ``scale_by_std``;
    - ``rloo`` (Ahmadian et al., 2024): ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)``, the leave-one-out
      baseline (``= k / (k - 1) * (r_i - mu)``), divided by ``s + eps`` with ``scale_by_std``.

    A group of identical rewards gives 0 advantages either way.

    Args:
        rewards: ``[P * k]`` floating point; k: samples per prompt, >= 2.

    Returns:
        ``[P * k]`` float32.
    """
    rewards = _float(rewards, "rewards")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (a baseline needs other samples of the prompt), got {k!r}")
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be [P * k] with k = {k}, got shape {tuple(rewards.shape)}")
    if kind not in GROUP_KINDS:
        raise ValueError(f"kind must be one of {GROUP_KINDS}, got {kind!r}")
    groups = rewards.view(-1, k)  # [P, k]
    mean = groups.mean(-1, keepdim=True)
    if kind == "grpo":
        adv = groups - mean
    else:
        adv = groups - (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    if scale_by_std:
        adv = adv / (groups.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


class RunningMeanBaseline:
    """REINFORCE's baseline: an exponential moving average of the mean sequence reward.

    ``advantages(rewards)`` returns ``rewards - b`` and then updates
    ``b <- momentum * b + (1 - momentum) * mean(rewards)``. The first batch, with no history, uses its
    own mean as ``b``.
    """

    def __init__(self, momentum: float = 0.9):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.value: float | None = None

    def advantages(self, rewards: Tensor) -> Tensor:
        """``[N]`` float32 ``rewards - b`` for ``rewards`` ``[N]``; updates ``b`` afterwards."""
        rewards = _float(rewards, "rewards")
        if rewards.dim() != 1 or rewards.numel() == 0:
            raise ValueError(f"rewards must be a non-empty [N] tensor, got shape {tuple(rewards.shape)}")
        mean = float(rewards.mean())
        baseline = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.momentum * self.value + (1.0 - self.momentum) * mean
        return rewards - baseline

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.value = None if state["value"] is None else float(state["value"])


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
            raise ValueError(f"kl_coef must be a float >= 0, got {kl_coef!r}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The proportional controller of Ziegler et al. (2019, "Fine-Tuning Language Models from Human
    Preferences", eq. 2) that steers the KL to the reference towards ``target``::

        err  = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + err * n_steps / horizon)

    so beta rises while the policy drifts further than the target and falls while it stays closer
    (the dual-descent step on beta of PPO with a KL penalty, with a bounded step).

    Args:
        init_kl_coef: beta at the start, > 0.
        target: the KL (per sequence, in nats) to hold, > 0.
        horizon: samples over which a 20% error moves beta by about 20%, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        for name, value in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """One controller step after a batch of ``n_steps`` samples whose mean KL was ``current_kl``."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
