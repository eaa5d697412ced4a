"""Public ops: autograd-aware functions built on the registered custom ops in ``_custom``."""

from rlhf_fast.ops.elementwise import kl_estimate, ranking_loss, reward_loss
from rlhf_fast.ops.token_ops import kl_divergence, token_entropy, token_logprobs, token_logprobs_and_entropy

__all__ = [
    "kl_divergence",
    "kl_estimate",
    "ranking_loss",
    "reward_loss",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
