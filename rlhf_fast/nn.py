"""``nn.Module`` forms of the losses, for code that prefers modules: hyper-parameters at
construction, tensors at call time. Each forwards to the functional of the same name in
:mod:`rlhf_fast` and returns what it returns.
"""

from __future__ import annotations

from torch import Tensor, nn

from rlhf_fast import ops


class _Loss(nn.Module):
    """Stores keyword hyper-parameters; ``forward(*tensors)`` calls ``_fn(*tensors, **kwargs)``."""

    _fn = None

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, *tensors: Tensor):
        return type(self)._fn(*tensors, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class CrossEntropyLoss(_Loss):
    """``CrossEntropyLoss(ignore_index=-100, reduction="mean", label_smoothing=0.0)(logits, labels)``;
    see :func:`rlhf_fast.cross_entropy`."""

    _fn = staticmethod(ops.cross_entropy)


class PPOLoss(_Loss):
    """``PPOLoss(clip_eps=0.2, ...)(logits, labels, old_logprobs, advantages, ref_logprobs=None)``.

    See :func:`rlhf_fast.ppo_loss`; ``ref_logprobs`` changes every batch, so it is a call argument.
    """

    def forward(self, logits, labels, old_logprobs, advantages, ref_logprobs=None):
        return ops.ppo_loss(logits, labels, old_logprobs, advantages, ref_logprobs=ref_logprobs, **self.kwargs)


class DPOLoss(_Loss):
    """``DPOLoss(beta=0.1, loss_type="sigmoid", ...)(chosen_logits, chosen_labels, rejected_logits,
    rejected_labels, ref_chosen_logps=None, ref_rejected_logps=None)``; see :func:`rlhf_fast.dpo_loss`."""

    def forward(
        self,
        chosen_logits,
        chosen_labels,
        rejected_logits,
        rejected_labels,
        ref_chosen_logps=None,
        ref_rejected_logps=None,
    ):
        return ops.dpo_loss(
            chosen_logits,
            chosen_labels,
            rejected_logits,
            rejected_labels,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.kwargs,
        )


class RewardLoss(_Loss):
    """``RewardLoss()(chosen_rewards, rejected_rewards, margin=None)``; see :func:`rlhf_fast.reward_loss`."""

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return ops.reward_loss(chosen_rewards, rejected_rewards, margin=margin)


class RankingLoss(_Loss):
    """``RankingLoss()(rewards [B, K])``, best first; see :func:`rlhf_fast.ranking_loss`."""

    _fn = staticmethod(ops.ranking_loss)


class SequenceLogprobs(_Loss):
    """``SequenceLogprobs(average=False)(logits, labels)``; see :func:`rlhf_fast.sequence_logprobs`."""

    _fn = staticmethod(ops.sequence_logprobs)


class KLDivergence(_Loss):
    """``KLDivergence(temperature=1.0)(p_logits, q_logits)`` per position; see :func:`rlhf_fast.kl_divergence`."""

    _fn = staticmethod(ops.kl_divergence)
