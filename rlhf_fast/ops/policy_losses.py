"""Policy losses on top of the per-token ops: sequence log-probs, PPO, DPO and its relatives.

The ``[tokens, vocab]`` work is one :func:`token_logprobs_and_entropy` (or :func:`token_logprobs`)
call; everything after it is element-wise math on ``[B, T]`` numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_fast import _validate as v
from rlhf_fast.ops import fused
from rlhf_fast.ops.elementwise import KL_ESTIMATORS, kl_estimate
from rlhf_fast.ops.token_ops import _prepare, token_logprobs, token_logprobs_and_entropy

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _per_token(t, name: str, labels: Tensor) -> Tensor:
    """A float ``[...]`` input that must broadcast to the labels' shape (e.g. ``[B, 1]`` advantages)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    # by hand: torch.broadcast_shapes costs ~15 us a call (symbolic-shape machinery), and a loss checks three
    broadcasts = t.dim() <= labels.dim() and all(
        s == 1 or s == n for s, n in zip(reversed(t.shape), reversed(labels.shape), strict=False)
    )
    if not broadcasts:
        raise ValueError(f"{name} must broadcast to the labels' shape {tuple(labels.shape)}, got {tuple(t.shape)}")
    v.check_same_device(t, labels, name, "labels")
    return t.float()


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over ``mask``; 0 (not NaN) when nothing is valid."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _aggregation_weights(mask: Tensor, loss_agg: str, n_valid: Tensor | None = None) -> Tensor:
    """Per-token weights ``w`` with ``loss = sum(w * loss_t)``; sequences are the rows of the last dim.

    ``token-mean``: ``1 / n_valid`` over the batch; ``seq-mean-token-mean``: ``1 / (n_t * n_seq)``;
    ``seq-mean-token-sum``: ``1 / n_seq``, where ``n_t`` counts a sequence's valid tokens and ``n_seq``
    the sequences with at least one (the others take no part in the mean). 0 on ignored tokens.
    ``n_valid``: ``mask.sum().clamp(min=1)`` when the caller has it already.
    """
    if loss_agg == "token-mean":
        return mask / (mask.sum().clamp(min=1) if n_valid is None else n_valid)
    n_tokens = mask.sum(-1, keepdim=True)
    n_seqs = (n_tokens > 0).sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return mask / (n_tokens.clamp(min=1) * n_seqs)
    return mask / n_seqs


def sequence_logprobs(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, average: bool = False, backend=None
) -> Tensor:
    """Sum (or, with ``average=True``, mean) of the label log-probs over each sequence's valid tokens.

    Args:
        logits: ``[..., T, V]``; labels: ``[..., T]`` (see :func:`token_logprobs`).
        average: divide by the number of valid tokens (0 for a sequence with none).

    Returns:
        ``[...]`` float32.
    """
    logp = token_logprobs(logits, labels, ignore_index=ignore_index, backend=backend)
    total = logp.sum(-1)
    if not average:
        return total
    return total / (labels != ignore_index).sum(-1).clamp(min=1)


def ppo_loss(
    logits: Tensor,
    labels: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    loss_agg: str = "token-mean",
    inplace_backward: bool = False,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss (Schulman et al., 2017) with a KL penalty and an entropy bonus.

    Per valid token, with ``ratio = exp(logp - old_logp)``::

        pg = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
        pg = min(pg, -A * dual_clip)                  where A < 0 (dual clip, Ye et al., 2020)
        loss_t = pg + kl_coef * k(logp, ref_logp) - entropy_coef * entropy

    and ``loss_agg`` reduces ``loss_t``: ``token-mean`` over all valid tokens of the batch,
    ``seq-mean-token-mean`` (mean per sequence, then over sequences) or ``seq-mean-token-sum``.

    Args:
        logits: ``[B, T, V]`` (any ``[..., T, V]``) policy logits; labels: ``[B, T]`` sampled tokens.
        old_logprobs: ``[B, T]`` log-probs under the rollout policy.
        advantages: ``[B, T]``, or anything broadcasting to it (``[B, 1]`` for sequence-level).
        clip_eps, clip_eps_high: the clip range ``[1 - clip_eps, 1 + clip_eps_high]``
            (``clip_eps_high`` defaults to ``clip_eps``; a larger one is DAPO's clip-higher).
        dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-A * c``.
        ref_logprobs: ``[B, T]`` reference-policy log-probs for the KL penalty (``kl_coef > 0``).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`rlhf_fast.kl_estimate`).
        entropy_coef: weight of the entropy bonus.
        temperature: the sampling temperature the rollout used (logits are divided by it).
        inplace_backward: write the logits' gradient over the logits buffer (see
            :func:`rlhf_fast.cross_entropy`; the logits are destroyed).

    When the logits require grad, the forward pass also computes their gradient (the per-token
    upstream gradient is known as soon as the token's log-prob is), so the logits are read twice
    in all instead of three times.

    Returns:
        ``(loss, stats)``: a 0-d float32 loss and float32 0-d detached tensors (no host sync)
        ``clip_frac`` (share of valid tokens where the clipped branch is taken), ``approx_kl``
        (mean k3 estimate of KL(new || old) per valid token), ``entropy`` (mean), ``kl_ref``
        (mean of the KL estimator against the reference; 0 without one).
    """
    v.check_logits(logits)
    v.check_labels(labels, logits)
    setup = PPOSetup.build(
        labels, old_logprobs, advantages, ref_logprobs, clip_eps, clip_eps_high, dual_clip, kl_coef,
        kl_estimator, entropy_coef, ignore_index, loss_agg,
    )  # fmt: skip
    fuse = logits.requires_grad and torch.is_grad_enabled() and not setup.side_inputs_need_grad
    if inplace_backward and not fuse:
        raise ValueError("inplace_backward=True needs logits that require grad (and no grad to the other inputs)")
    if fuse:
        rows, flat, temperature, ignore_index, backend = _prepare(
            logits, labels, temperature, ignore_index, backend, allow_copy=not inplace_backward
        )
        (logp, entropy, _, _), grad = fused.stats_with_gradient(
            logits, rows, flat, temperature, ignore_index, with_entropy=True, with_mean_logp=False, mode=1,
            coefs=setup.coefs(), params=setup.params(), inplace=inplace_backward, backend=backend,
        )  # fmt: skip
        loss, stats = setup.finish(logp.view(labels.shape), entropy.float().view(labels.shape))
        return fused.attach_gradient(logits, loss, grad), stats
    logp, entropy = token_logprobs_and_entropy(
        logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend
    )
    return setup.finish(logp, entropy)


@dataclass
class PPOSetup:
    """The validated, masked per-token inputs of a PPO loss, shared by the logits and linear forms."""

    old_logprobs: Tensor
    advantages: Tensor
    ref_logprobs: Tensor | None
    mask: Tensor
    n_valid: Tensor  # mask.sum().clamp(min=1): the stats' denominator
    weight: Tensor  # loss = sum(weight * loss_t), from loss_agg
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    side_inputs_need_grad: bool

    @staticmethod
    def build(
        labels, old_logprobs, advantages, ref_logprobs, clip_eps, clip_eps_high, dual_clip, kl_coef,
        kl_estimator, entropy_coef, ignore_index, loss_agg,
    ) -> PPOSetup:  # fmt: skip
        ignore_index = v.check_ignore_index(ignore_index)
        old_logprobs = _per_token(old_logprobs, "old_logprobs", labels)
        advantages = _per_token(advantages, "advantages", labels)
        if ref_logprobs is not None:
            ref_logprobs = _per_token(ref_logprobs, "ref_logprobs", labels)
        clip_low = v.check_float("clip_eps", clip_eps, 0.0, 1.0)
        clip_high = clip_low if clip_eps_high is None else v.check_float("clip_eps_high", clip_eps_high, 0.0, None)
        if dual_clip is not None and not (
            isinstance(dual_clip, (int, float)) and not isinstance(dual_clip, bool) and 1.0 < dual_clip < math.inf
        ):
            raise ValueError(f"dual_clip must be a finite float > 1 or None, got {dual_clip!r}")
        kl_coef, entropy_coef = v.check_coef("kl_coef", kl_coef), v.check_coef("entropy_coef", entropy_coef)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        if loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
        if kl_coef != 0.0 and ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs")
        side_grad = any(t is not None and t.requires_grad for t in (old_logprobs, advantages, ref_logprobs))
        valid = labels != ignore_index
        mask = valid.float()
        n_valid = mask.sum().clamp(min=1)
        # Ignored positions may hold anything (padding, -inf): zero them so 0 * NaN never reaches a sum.
        masked = [None if t is None else torch.where(valid, t, 0.0).expand(labels.shape) for t in
                  (old_logprobs, advantages, ref_logprobs)]  # fmt: skip
        return PPOSetup(
            *masked, mask, n_valid, _aggregation_weights(mask, loss_agg, n_valid), clip_low, clip_high, dual_clip,
            kl_coef, kl_estimator, entropy_coef, side_grad,
        )  # fmt: skip

    def coefs(self) -> Tensor:
        """``[old_logp, adv, ref_logp, weight]`` as ``[4, N]``: the fused kernels' ``mode 1`` input."""
        ref = self.ref_logprobs if self.ref_logprobs is not None else torch.zeros_like(self.old_logprobs)
        return torch.stack([self.old_logprobs, self.advantages, ref, self.weight]).reshape(4, -1).contiguous()

    def params(self) -> list[float]:
        kl_kind = float(KL_ESTIMATORS.index(self.kl_estimator) + 1)
        kl_coef = self.kl_coef if self.ref_logprobs is not None else 0.0
        return [self.clip_low, self.clip_high, float(self.dual_clip or 0.0), kl_coef, kl_kind, self.entropy_coef]

    def finish(self, logp: Tensor, entropy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and stats from the per-token log-probs and entropies (differentiable or not).

        Written in few tensor ops: at 1024 tokens each costs a few microseconds, as much as a call's kernel
        spends on 500 vocabulary columns."""
        adv = self.advantages
        log_ratio = logp - self.old_logprobs
        # A token with advantage 0 (every token of a GRPO group whose rewards are equal) has pg = 0 whatever
        # its ratio; taken as ratio 1, so that a ratio that overflows float32 does not make -0 * inf = NaN
        # (and the where comes before the exp: its backward would also meet 0 * inf).
        ratio = torch.exp(torch.where(adv == 0, 0.0, log_ratio))
        neg_adv = -adv
        pg_unclipped = neg_adv * ratio
        pg_clipped = neg_adv * torch.clamp(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        per_token = torch.maximum(pg_unclipped, pg_clipped)
        if self.dual_clip is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, neg_adv * self.dual_clip), per_token)
        kl = None
        if self.ref_logprobs is not None:
            kl = kl_estimate(logp, self.ref_logprobs, self.kl_estimator)
            per_token = torch.add(per_token, kl, alpha=self.kl_coef)
        if self.entropy_coef != 0.0:
            per_token = torch.sub(per_token, entropy, alpha=self.entropy_coef)
        loss = torch.dot(per_token.reshape(-1), self.weight.reshape(-1))
        with torch.no_grad():
            # the four masked means as one [4, N] x [N] product
            parts = [(pg_clipped > pg_unclipped).float(), torch.expm1(-log_ratio) + log_ratio, entropy]
            parts.append(torch.zeros_like(log_ratio) if kl is None else kl)
            means = (torch.stack(parts).view(4, -1) @ self.mask.view(-1)) / self.n_valid
        return loss, dict(zip(("clip_frac", "approx_kl", "entropy", "kl_ref"), means.unbind(), strict=True))


def dpo_loss(
    chosen_logits: Tensor,
    chosen_labels: Tensor,
    rejected_logits: Tensor,
    rejected_labels: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_logprobs: bool = False,
    nll_coef: float = 0.0,
    backend=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization (Rafailov et al., 2023) and its relatives, from logits.

    With sequence log-probs ``pc, pr`` (policy) and ``rc, rr`` (reference) of the chosen and
    rejected responses and ``z = (pc - rc) - (pr - rr)``, per pair:

    - ``sigmoid``: ``-(1 - ls) * logsigmoid(beta * z) - ls * logsigmoid(-beta * z)``
      (``ls = label_smoothing > 0``: conservative DPO);
    - ``hinge``: ``relu(1 - beta * z)`` (SLiC-HF's calibration loss, Zhao et al., 2023);
    - ``ipo``: ``(z - 1 / (2 * beta))**2`` (Azar et al., 2023);
    - ``robust``: ``(-(1 - ls) * logsigmoid(beta * z) + ls * logsigmoid(-beta * z)) / (1 - 2 * ls)``
      (Chowdhury et al., 2024);

    averaged over the batch, plus ``nll_coef`` times the mean NLL of the chosen tokens (the SLiC-HF
    / RPO regularizer). With both reference tensors ``None`` the loss is reference-free.

    Args:
        chosen_logits, rejected_logits: ``[B, T, V]`` (may be views into one ``[2B, T, V]`` output).
        chosen_labels, rejected_labels: ``[B, T]``, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs, or both ``None``.
        average_logprobs: use per-token means instead of sums for the sequence log-probs.

    Returns:
        ``(loss, stats)`` with float32 0-d detached ``chosen_rewards`` (mean ``beta * (pc - rc)``),
        ``rejected_rewards``, ``reward_margin`` and ``reward_accuracy`` (share of pairs with the
        chosen reward above the rejected one).
    """
    v.check_logits(chosen_logits, "chosen_logits")
    v.check_logits(rejected_logits, "rejected_logits")
    v.check_labels(chosen_labels, chosen_logits, "chosen_labels")
    v.check_labels(rejected_labels, rejected_logits, "rejected_labels")
    base = _concatenated_base(chosen_logits, rejected_logits)
    if base is not None:
        # One op over the whole [2B, T, V] output: the logits gradient is then a single tensor, instead
        # of one per half that autograd would add into a third, full-size one.
        B = chosen_logits.shape[0]
        both = functools.cache(
            lambda: token_logprobs(
                base, torch.cat([chosen_labels, rejected_labels]), ignore_index=ignore_index, backend=backend
            )
        )
        chosen_fn, rejected_fn = (lambda: both()[:B]), (lambda: both()[B:])
    else:
        chosen_fn = lambda: token_logprobs(chosen_logits, chosen_labels, ignore_index=ignore_index, backend=backend)
        rejected_fn = lambda: token_logprobs(
            rejected_logits, rejected_labels, ignore_index=ignore_index, backend=backend
        )
    return dpo_from_token_logprobs(
        chosen_fn,
        rejected_fn,
        chosen_labels, rejected_labels, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, ignore_index=ignore_index, average_logprobs=average_logprobs,
        nll_coef=nll_coef,
    )  # fmt: skip


def _concatenated_base(chosen: Tensor, rejected: Tensor) -> Tensor | None:
    """The ``[2B, ...]`` tensor whose halves ``[:B]`` and ``[B:]`` are exactly ``chosen`` and ``rejected``
    (the usual concatenated forward), or None."""
    if torch.compiler.is_compiling():
        return None  # view bases are not traceable; the two-call path is equally correct
    base = chosen._base
    if base is None or rejected._base is not base or chosen.shape != rejected.shape or chosen.dim() < 2:
        return None
    B = chosen.shape[0]
    if base.shape != (2 * B, *chosen.shape[1:]) or chosen.stride() != base.stride():
        return None
    if rejected.stride() != base.stride() or chosen.storage_offset() != base.storage_offset():
        return None
    if rejected.storage_offset() != base.storage_offset() + B * base.stride(0):
        return None
    return base


def dpo_from_token_logprobs(
    chosen_token_logprobs, rejected_token_logprobs, chosen_labels, rejected_labels, ref_chosen_logps,
    ref_rejected_logps, *, beta, loss_type, label_smoothing, ignore_index, average_logprobs, nll_coef,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The DPO family from per-token log-probs; shared by the logits and the linear forms.

    ``chosen_token_logprobs``/``rejected_token_logprobs`` are called (after every hyper-parameter is
    validated, so bad input fails before any kernel) and return ``[B, T]`` differentiable log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"beta must be a finite float > 0, got {beta!r}")
    ls = v.check_float("label_smoothing", label_smoothing, 0.0, 0.5)
    nll_coef = v.check_float("nll_coef", nll_coef, 0.0, None)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must both be tensors or both be None")
    n_chosen, n_rejected = chosen_labels.shape[:-1], rejected_labels.shape[:-1]
    if n_chosen != n_rejected:
        raise ValueError(
            f"rejected_labels must have as many sequences as chosen_labels: {tuple(n_rejected)} vs {tuple(n_chosen)}"
        )
    if ref_chosen_logps is not None:
        rc = _per_sequence(ref_chosen_logps, "ref_chosen_logps", n_chosen, chosen_labels.device)
        rr = _per_sequence(ref_rejected_logps, "ref_rejected_logps", n_chosen, chosen_labels.device)

    def sequence(token_logp, labels):
        mask = (labels != ignore_index).float()
        total = token_logp.sum(-1)
        return (total / mask.sum(-1).clamp(min=1) if average_logprobs else total), mask

    chosen_token_logp = chosen_token_logprobs()
    pc, chosen_mask = sequence(chosen_token_logp, chosen_labels)
    pr, _ = sequence(rejected_token_logprobs(), rejected_labels)
    chosen_ratio, rejected_ratio = (pc - rc, pr - rr) if ref_chosen_logps is not None else (pc, pr)
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(beta * z) - ls * F.logsigmoid(-beta * z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - ls) * F.logsigmoid(beta * z) + ls * F.logsigmoid(-beta * z)) / (1 - 2 * ls)
    loss = losses.mean()
    if nll_coef != 0.0:
        loss = loss + nll_coef * _masked_mean(-chosen_token_logp, chosen_mask)

    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio
        rejected_rewards = beta * rejected_ratio
        stats = {
            "chosen_rewards": chosen_rewards.mean(),
            "rejected_rewards": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        }
    return loss, stats


def _per_sequence(t, name: str, shape, device) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (one value per sequence), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the labels are on {device}")
    return t.float()
