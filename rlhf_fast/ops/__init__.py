"""Public ops: autograd-aware functions built on the registered custom ops in ``_custom``."""

from rlhf_fast.ops.cross_entropy import cross_entropy
from rlhf_fast.ops.elementwise import kl_estimate, ranking_loss, reward_loss
from rlhf_fast.ops.linear import (
    linear_cross_entropy,
    linear_dpo_loss,
    linear_kl_divergence,
    linear_ppo_loss,
    linear_token_entropy,
    linear_token_logprobs,
    linear_token_logprobs_and_entropy,
)
from rlhf_fast.ops.policy_losses import dpo_loss, ppo_loss, sequence_logprobs
from rlhf_fast.ops.token_ops import kl_divergence, token_entropy, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "cross_entropy",
    "dpo_loss",
    "kl_divergence",
    "kl_estimate",
    "linear_cross_entropy",
    "linear_dpo_loss",
    "linear_kl_divergence",
    "linear_ppo_loss",
    "linear_token_entropy",
    "linear_token_logprobs",
    "linear_token_logprobs_and_entropy",
    "ppo_loss",
    "ranking_loss",
    "reward_loss",
    "sequence_logprobs",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
